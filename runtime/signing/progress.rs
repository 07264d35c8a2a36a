//! A progress bar for hashing large models, drawn on stderr only when it is a terminal.

use std::io::IsTerminal;
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressStyle};

use super::Progress;

/// Models smaller than this hash in well under a second: no bar.
const MIN_BYTES: u64 = 512 * 1024 * 1024;

pub struct TerminalProgress {
    label: &'static str,
    bar: OnceLock<ProgressBar>,
}

impl TerminalProgress {
    pub fn new(label: &'static str) -> Self {
        TerminalProgress {
            label,
            bar: OnceLock::new(),
        }
    }
}

impl Progress for TerminalProgress {
    fn start(&self, total_bytes: u64) {
        if total_bytes < MIN_BYTES || !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::new(total_bytes).with_message(self.label);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        let _ = self.bar.set(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.bar.get() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}
