//! `securerun embed MODEL --text TEXT [--text TEXT ...]`

use std::io::Write;

use clap::Args;

use super::{CmdResult, RunModelArgs};

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
    let settings = args.common.worker_settings()?;
    let opened = crate::open(&args.common.model.model, &args.common.open_options()?)?;
    // A text-generation model is refused here, before a worker starts.
    opened.require(securerun_models::Task::Embeddings)?;
    let vectors = match settings {
        None => opened.embedder()?.embed(&args.texts)?,
        Some(settings) => opened.confined(settings)?.embed(&args.texts)?,
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
