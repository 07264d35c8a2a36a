//! `securerun embed MODEL --text TEXT [--text TEXT ...]`

use std::io::Write;

use clap::Args;

use super::{CmdResult, RunModelArgs};
use crate::worker::Task;
use crate::{open_confined, open_embedder};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    common: RunModelArgs,
    /// Text to embed (repeat for several).
    #[arg(long = "text", value_name = "TEXT", required = true)]
    texts: Vec<String>,
}

pub fn run(args: EmbedArgs) -> CmdResult {
    super::run::warn_unsigned(&args.common);
    let opts = args.common.open_options()?;
    let vectors = match args.common.worker_settings()? {
        None => open_embedder(&args.common.model.model, &opts)?.embed(&args.texts)?,
        Some(settings) => {
            open_confined(&args.common.model.model, &opts, Task::Embed, Some(settings))?
                .embed(&args.texts)?
        }
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &vectors)?;
    writeln!(out)?;
    Ok(())
}

impl EmbedArgs {
    pub(super) fn threads(&self) -> Option<u16> {
        self.common.threads
    }
}
