//! Cost of confinement (run `scripts/fetch-models.sh` first): worker start-up (spawn, confine,
//! receive the verified model, load it) and end-to-end generation speed confined vs in process,
//! runs interleaved so both see the same machine state.
//!
//!     cargo bench --bench sandbox
//!
//! No assertions: numbers go to docs/benchmarks.md.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use securerun::worker::WorkerSettings;
use securerun::{open_text_model, GenerationParams, OpenOptions, Prompt};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let full = std::env::args().any(|a| a == "--bench");
    let (decode_tokens, runs) = if full { (128, 5) } else { (4, 1) };
    let model = std::env::var_os("SECURERUN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
        .join("smollm2-135m-instruct");
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let opts = OpenOptions {
        allow_unsigned: true,
        ..Default::default()
    };
    let mut settings = WorkerSettings::new()?;
    settings.program = PathBuf::from(env!("CARGO_BIN_EXE_securerun"));
    settings.threads = threads;

    let mut startup = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let m = securerun::open(&model, &opts)?.confined(settings.clone())?;
        startup.push(started.elapsed().as_secs_f64());
        drop(m);
    }
    let mut load = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        drop(open_text_model(&model, &opts)?);
        load.push(started.elapsed().as_secs_f64());
    }

    let prompt = Prompt::Text("The history of the city begins with a small settlement".into());
    let params = GenerationParams {
        max_tokens: decode_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut local = open_text_model(&model, &opts)?;
    let mut confined = securerun::open(&model, &opts)?.confined(settings)?;
    let (mut local_rate, mut confined_rate, mut worker_decode) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        let g = local.generate(&prompt, &params, &mut |_| ControlFlow::Continue(()))?;
        local_rate.push(g.completion_tokens() as f64 / started.elapsed().as_secs_f64());
        let started = Instant::now();
        let g = confined.generate(&prompt, &params, &mut |_| ControlFlow::Continue(()))?;
        confined_rate.push(g.completion_tokens() as f64 / started.elapsed().as_secs_f64());
        worker_decode.push((g.completion_tokens() - 1) as f64 / g.decode_time.as_secs_f64());
    }
    let (l, c) = (median(local_rate), median(confined_rate));
    let result = serde_json::json!({
        "threads": threads,
        "model": "SmolLM2-135M-Instruct f32",
        "generated_tokens": decode_tokens,
        "in_process_load_s": median(load),
        "confined_startup_s": median(startup),
        "in_process_tok_s_end_to_end": l,
        "confined_tok_s_end_to_end": c,
        "confined_vs_in_process": c / l,
        "confined_decode_tok_s_in_worker": median(worker_decode),
    });
    for (k, v) in result.as_object().into_iter().flatten() {
        println!("{k:<30} {v}");
    }
    Ok(())
}
