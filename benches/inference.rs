//! Inference benchmarks on the real models (run `scripts/fetch-models.sh` first):
//! load time, prefill and decode tokens/s, embedding sentences/s, peak RSS.
//!
//!     cargo bench --bench inference                 # table
//!     cargo bench --bench inference -- --json       # one JSON object (benches/compare_llamacpp.py)
//!
//! Thread count: RAYON_NUM_THREADS (default: all cores). No assertions: numbers go to
//! docs/benchmarks.md.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use securerun::{open_embedder, open_text_model, GenerationParams, OpenOptions, Prompt};

/// (prefill tokens, decode tokens, runs): full under `cargo bench`; a quick smoke run under
/// `cargo test --all-targets` (which runs this `main` without `--bench`), so the test suite
/// proves the benchmark still works without spending a minute on it.
fn sizes() -> (usize, usize, usize) {
    if std::env::args().any(|a| a == "--bench") {
        (128, 128, 3)
    } else {
        (16, 4, 1)
    }
}

fn models_dir() -> PathBuf {
    std::env::var_os("SECURERUN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
}

/// Peak resident set size of this process, from /proc (kB).
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let json = std::env::args().any(|a| a == "--json");
    let (prefill_tokens, decode_tokens, runs) = sizes();
    let dir = models_dir();
    // Benchmarks measure inference; verification has its own numbers in docs/benchmarks.md.
    let opts = OpenOptions {
        allow_unsigned: true,
        ..Default::default()
    };
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // As the CLI does: without it candle counts CPUs through /proc on every matmul.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());

    // Load: resolve + validate + build (weights copied out of the mapping into f32 tensors).
    let started = Instant::now();
    let mut model = open_text_model(&dir.join("smollm2-135m-instruct"), &opts)?;
    let llm_load_s = started.elapsed().as_secs_f64();
    let rss_after_llm_load = peak_rss_kb();

    // A fixed prompt of exactly `prefill_tokens` tokens.
    let text = "The history of the city begins with a small settlement by the river. ".repeat(40);
    let mut ids = model.prompt_ids(&Prompt::Text(text))?;
    ids.truncate(prefill_tokens);

    let params = GenerationParams {
        max_tokens: decode_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..runs {
        let out = model.generate_from_ids(&ids, &params, &mut |_| ControlFlow::Continue(()))?;
        prefill.push(ids.len() as f64 / out.prefill_time.as_secs_f64());
        // The first generated token comes from the prefill logits; the rest each cost a step.
        decode.push((out.completion_tokens() - 1) as f64 / out.decode_time.as_secs_f64());
    }
    let rss_after_generate = peak_rss_kb();
    drop(model);

    let started = Instant::now();
    let embedder = open_embedder(&dir.join("all-minilm-l6-v2"), &opts)?;
    let embed_load_s = started.elapsed().as_secs_f64();
    let sentences: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "Sentence number {i} describes a routine maintenance check of pump {}.",
                i % 7
            )
        })
        .collect();
    let mut embed_rates = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let v = embedder.embed(&sentences)?;
        embed_rates.push(v.len() as f64 / started.elapsed().as_secs_f64());
    }

    let result = serde_json::json!({
        "threads": threads,
        "llm": "SmolLM2-135M-Instruct f32",
        "llm_load_s": llm_load_s,
        "prefill_tokens": ids.len(),
        "prefill_tok_s": median(prefill),
        "decode_tokens": decode_tokens,
        "decode_tok_s": median(decode),
        "peak_rss_mb_after_llm_load": rss_after_llm_load / 1024,
        "peak_rss_mb_after_generate": rss_after_generate / 1024,
        "embed_model": "all-MiniLM-L6-v2 f32",
        "embed_load_s": embed_load_s,
        "embed_sentences_s": median(embed_rates),
    });
    if json {
        println!("{result}");
    } else {
        for (k, v) in result.as_object().into_iter().flatten() {
            println!("{k:<28} {v}");
        }
    }
    Ok(())
}
