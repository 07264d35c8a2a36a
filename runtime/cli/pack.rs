//! `securerun pack DIR --out FILE.safetensors`

use std::path::PathBuf;

use clap::Args;
use securerun_models::pack::pack;
use securerun_models::ModelSource;

use super::{CmdResult, ModelArgs};

#[derive(Args)]
pub struct PackArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output .safetensors file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: PackArgs) -> CmdResult {
    let limits = args.model.limits();
    let source = ModelSource::open(&args.model.model, &limits)?;
    let summary = pack(&source, &args.out, args.force, &limits)?;
    eprintln!(
        "packed {} tensors and {} into {} ({} bytes)",
        summary.tensors,
        if summary.embedded.is_empty() {
            "no configuration files".to_string()
        } else {
            summary.embedded.join(", ")
        },
        summary.path.display(),
        summary.bytes
    );
    Ok(())
}
