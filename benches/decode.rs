//! One measurement of a text model at one precision, in this process or in the confined
//! worker: load time, prefill and decode tokens/s, peak RSS. `benches/compare_precisions.py`
//! runs it (and llama.cpp) interleaved and takes medians; run alone:
//!
//!     cargo bench --bench decode -- --model DIR --dtype q8_0 --prefill 128 --decode 128 [--confined]
//!         [--grammar]
//!
//! `--grammar` constrains the output to a JSON schema that keeps the model writing (an array of
//! at least 256 short strings): the decode rate then includes the grammar engine's mask at
//! every step.
//!
//! Threads: RAYON_NUM_THREADS. Under `cargo test --all-targets` (no `--bench`) it makes one
//! short smoke run on SmolLM2 so the suite proves it still works.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use securerun::models::Precision;
use securerun::{open_text_model, GenerationParams, OpenOptions, Prompt};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Peak resident set size of this process and its children (the worker), kB.
fn peak_rss_kb() -> (u64, u64) {
    let own = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    (own, 0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bench = std::env::args().any(|a| a == "--bench");
    let default_model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/smollm2-135m-instruct");
    let model_dir = arg("--model").map(PathBuf::from).unwrap_or(default_model);
    let precision: Precision = arg("--dtype").as_deref().unwrap_or("auto").parse()?;
    let num = |name: &str, bench_default: usize, smoke: usize| -> usize {
        arg(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(if bench { bench_default } else { smoke })
    };
    let (prefill_tokens, decode_tokens) = (num("--prefill", 128, 8), num("--decode", 128, 4));
    let confined = std::env::args().any(|a| a == "--confined");
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let opts = OpenOptions {
        allow_unsigned: true,
        precision,
        ..Default::default()
    };
    // A fixed prompt cut to exactly `prefill_tokens` tokens.
    let text = "The history of the city begins with a small settlement by the river. ".repeat(400);
    let grammar = std::env::args().any(|a| a == "--grammar");
    let params = GenerationParams {
        max_tokens: decode_tokens,
        ignore_eos: true,
        grammar: grammar.then(|| securerun::models::grammar::OutputGrammar::JsonSchema {
            schema: serde_json::json!({"type": "array", "minItems": 256,
                "items": {"type": "string", "maxLength": 12}})
            .to_string(),
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let out = if confined {
        // The worker is the securerun binary (this bench binary has no worker mode).
        let mut settings = securerun::worker::WorkerSettings::new()?;
        settings.program = env!("CARGO_BIN_EXE_securerun").into();
        let mut m = securerun::open(&model_dir, &opts)?.confined(settings)?;
        let load_s = started.elapsed().as_secs_f64();
        let mut ids = m.encoder().prompt_ids(&Prompt::Text(text))?;
        ids.truncate(prefill_tokens);
        let control = securerun::worker::supervisor::RequestControl::none();
        let g = m.generate_ids(&ids, &params, &control, &mut |_| ControlFlow::Continue(()))?;
        (load_s, ids.len(), g)
    } else {
        let mut m = open_text_model(&model_dir, &opts)?;
        let load_s = started.elapsed().as_secs_f64();
        let mut ids = m.prompt_ids(&Prompt::Text(text))?;
        ids.truncate(prefill_tokens);
        let g = m.generate_from_ids(&ids, &params, &mut |_| ControlFlow::Continue(()))?;
        (load_s, ids.len(), g)
    };
    let (load_s, prompt, g) = out;
    let result = serde_json::json!({
        "engine": "securerun",
        "model": model_dir.file_name().map(|n| n.to_string_lossy().to_string()),
        "dtype": precision.to_string(),
        "resolved": precision.resolve().to_string(),
        "threads": threads,
        "confined": confined,
        "grammar": grammar,
        "load_s": load_s,
        "prefill_tokens": prompt,
        "prefill_tok_s": prompt as f64 / g.prefill_time.as_secs_f64(),
        "decode_tokens": g.completion_tokens(),
        // The first generated token comes from the prefill logits; the rest each cost a step.
        "decode_tok_s": (g.completion_tokens().saturating_sub(1)) as f64 / g.decode_time.as_secs_f64(),
        "peak_rss_mb": peak_rss_kb().0 / 1024,
    });
    println!("{result}");
    Ok(())
}
