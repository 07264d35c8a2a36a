//! `securerun inspect MODEL`

use std::fmt::Write as _;

use clap::Args;
use securerun_models::inspect::{report, ModelReport};
use securerun_models::ModelSource;

use super::{CmdResult, ModelArgs};

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also show what the weights become at this run precision (auto, f32, bf16, f16, q8_0,
    /// q4_0, q4_k): the mix of types after fallbacks, and the memory they take.
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<securerun_models::Precision>,
}

pub fn run(args: InspectArgs) -> CmdResult {
    let source = ModelSource::open(&args.model.model, &args.model.limits())?;
    let report = report(&source);
    let plan = args
        .dtype
        .map(|p| securerun_models::inspect::precision_report(&source, p));
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(plan) = &plan {
            v["run_precision"] = serde_json::to_value(plan)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&report));
        if let Some(plan) = &plan {
            print!("{}", render_plan(plan));
        }
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn render_plan(p: &securerun_models::inspect::PrecisionReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "at --dtype {} (runs as {}): {} of weights, {} of them read in place from the file",
        p.precision,
        p.resolved,
        human_bytes(p.bytes),
        human_bytes(p.in_place_bytes)
    );
    for (t, v) in &p.types {
        let _ = writeln!(
            s,
            "  {t:<8} {} tensors, {} parameters, {}",
            v.tensors,
            v.parameters,
            human_bytes(v.bytes)
        );
    }
    s
}

fn render(r: &ModelReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model:        {}", r.path);
    let _ = writeln!(s, "layout:       {}", r.layout);
    let _ = writeln!(s, "architecture: {}", r.architecture);
    let _ = writeln!(
        s,
        "parameters:   {} ({:.1} M)",
        r.parameters,
        r.parameters as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "weights:      {} ({} bytes)",
        human_bytes(r.weight_bytes),
        r.weight_bytes
    );
    let _ = writeln!(s, "files:");
    for f in &r.files {
        let _ = writeln!(
            s,
            "  {}  {} ({} tensors, header {} bytes)",
            f.path,
            human_bytes(f.bytes),
            f.tensors,
            f.header_bytes
        );
    }
    let _ = writeln!(s, "dtypes:");
    for (d, v) in &r.dtypes {
        let _ = writeln!(
            s,
            "  {d:<8} {} tensors, {} parameters, {}",
            v.tensors,
            v.parameters,
            human_bytes(v.bytes)
        );
    }
    if !r.aux_files.is_empty() {
        let _ = writeln!(s, "configuration files:");
        for a in &r.aux_files {
            let _ = writeln!(s, "  {:<28} {:>10} bytes  {}", a.name, a.bytes, a.origin);
        }
    }
    if !r.metadata.is_empty() {
        let _ = writeln!(s, "metadata:");
        for (k, v) in &r.metadata {
            let v: String = v.chars().take(120).collect();
            let _ = writeln!(s, "  {k} = {v:?}");
        }
    }
    let _ = writeln!(s, "tensors ({}):", r.tensors.len());
    for t in &r.tensors {
        let _ = writeln!(s, "  {:<60} {:<5} {:?}", t.name, t.dtype, t.shape);
    }
    s
}
