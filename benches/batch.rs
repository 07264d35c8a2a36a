//! Aggregate decode throughput of continuous batching ([`securerun::models::Batch`]): N
//! sequences generating together in one process, against the same model generating one at a
//! time, for docs/benchmarks.md (issue 14's "aggregate at 4 clients ≥ 2.5× single stream"):
//!
//!     RAYON_NUM_THREADS=2 cargo bench --bench batch -- --model DIR --dtype q8_0 \
//!         --sequences 1,2,4,8 --prefill 64 --decode 64 --runs 3
//!
//! Prints one JSON line per sequence count (medians of `--runs`). Under `cargo test
//! --all-targets` (no `--bench`) one short pass on SmolLM2 proves it still runs.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use securerun::models::{Batch, BatchLimits, Precision};
use securerun::{open_text_model, GenerationParams, OpenOptions, Prompt};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    let (prefill, decode, runs) = (
        num("--prefill", 64, 8),
        num("--decode", 64, 4),
        num("--runs", 3, 1),
    );
    let counts: Vec<usize> = arg("--sequences")
        .unwrap_or_else(|| {
            if bench {
                "1,2,4,8".into()
            } else {
                "1,2".into()
            }
        })
        .split(',')
        .map(|c| c.parse())
        .collect::<Result<_, _>>()?;
    let opts = OpenOptions {
        allow_unsigned: true,
        precision,
        ..Default::default()
    };
    let model = open_text_model(&model_dir, &opts)?;
    let params = GenerationParams {
        max_tokens: decode,
        ignore_eos: true,
        ..Default::default()
    };
    // Different prompts per sequence (a shared one would hide nothing here, but reads truer).
    let prompts: Vec<Vec<u32>> = (0..counts.iter().copied().max().unwrap_or(1))
        .map(|i| {
            let text =
                format!("Chapter {i}. The history of the city begins by the river. ").repeat(200);
            let mut ids = model.prompt_ids(&Prompt::Text(text))?;
            ids.truncate(prefill);
            Ok(ids)
        })
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    for &n in &counts {
        let mut rates = Vec::new();
        let mut steps_per_s = Vec::new();
        for _ in 0..runs {
            let limits = BatchLimits {
                max_sequences: n,
                max_step_tokens: (n * prefill).max(n),
            };
            let mut batch = Batch::new(&model, limits)?;
            for p in &prompts[..n] {
                batch.add(
                    p,
                    &params,
                    None,
                    Box::new(|_: &str| ControlFlow::Continue(())),
                )?;
            }
            // The first step prefills every prompt; decode is timed from the second.
            let mut generated = 0;
            for f in batch.step()? {
                generated += f.result?.token_ids.len();
            }
            let started = Instant::now();
            let mut steps = 0;
            while !batch.is_empty() {
                for f in batch.step()? {
                    generated += f.result?.token_ids.len();
                }
                steps += 1;
            }
            let secs = started.elapsed().as_secs_f64();
            // The prefill step produced each sequence's first token.
            rates.push((generated - n) as f64 / secs);
            steps_per_s.push(steps as f64 / secs);
        }
        println!(
            "{}",
            serde_json::json!({
                "sequences": n,
                "dtype": precision.to_string(),
                "threads": std::env::var("RAYON_NUM_THREADS").ok(),
                "aggregate_decode_tok_s": median(rates),
                "steps_per_s": median(steps_per_s),
            })
        );
    }
    Ok(())
}
