//! Sentence embeddings per second of one engine at one batch size, in this process:
//! `benches/compare_embeddings.py` runs it next to ONNX Runtime (interleaved, medians); alone:
//!
//!     RAYON_NUM_THREADS=2 cargo bench --bench embed -- --batch 32 [--engine reference] [--dtype bf16]
//!
//! Under `cargo test --all-targets` (no `--bench`) one short pass proves it still runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use securerun::models::load::Engine;
use securerun::models::{Embedder, LoadOptions, ModelSource, Precision};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The sentences every engine embeds: lengths from a few words to a paragraph.
fn sentences(n: usize) -> Vec<String> {
    let words = "the pump on line seven was inspected after the night shift reported a slow \
                 pressure drop and a faint noise near the outlet valve which the crew replaced";
    let words: Vec<&str> = words.split(' ').collect();
    (0..n)
        .map(|i| {
            let len = 4 + (i * 7) % (words.len() - 4);
            format!("{} {i}.", words[..len].join(" "))
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bench = std::env::args().any(|a| a == "--bench");
    let dir = arg("--model").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/all-minilm-l6-v2")
    });
    let batch: usize = arg("--batch").and_then(|v| v.parse().ok()).unwrap_or(32);
    let total: usize = if bench { 64 } else { 4 };
    let reps: usize = arg("--reps")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 5 } else { 1 });
    let engine = match arg("--engine").as_deref() {
        Some("reference") => Engine::Reference,
        _ => Engine::Best,
    };
    let precision: Precision = arg("--dtype").as_deref().unwrap_or("auto").parse()?;
    let opts = LoadOptions {
        engine,
        precision,
        ..Default::default()
    };
    let started = Instant::now();
    let source = Arc::new(ModelSource::open(&dir, &opts.limits)?);
    let embedder = Embedder::load(&source, &opts)?;
    let load_s = started.elapsed().as_secs_f64();
    let texts = sentences(total);
    let mut rates = Vec::new();
    embedder.embed(&texts[..batch.min(total)])?; // warm-up
    for _ in 0..reps {
        let started = Instant::now();
        for chunk in texts.chunks(batch.max(1)) {
            embedder.embed(chunk)?;
        }
        rates.push(total as f64 / started.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    // For a peer's agreement check: the first three sentences' vectors.
    let first = embedder.embed(&texts[..3.min(total)])?;
    println!(
        "{}",
        serde_json::json!({
            "engine": if engine == Engine::Best { "securerun" } else { "candle" },
            "batch": batch,
            "sentences": total,
            "load_s": load_s,
            "sentences_s": rates[rates.len() / 2],
            "first": first,
        })
    );
    Ok(())
}
