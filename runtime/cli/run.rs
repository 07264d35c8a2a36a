//! `securerun run MODEL --prompt TEXT [--chat] ...`

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;

use clap::Args;

use super::{CmdResult, RunModelArgs};
use crate::{ChatMessage, GenerationParams, Prompt, SamplingParams};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    common: RunModelArgs,
    /// The prompt (the user message with --chat).
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// Treat the prompt as a chat message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (otherwise the template's default, if any).
    #[arg(long, value_name = "TEXT", requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, value_name = "T", default_value_t = 0.7)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// Keep only the K most likely tokens.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Penalty (> 1) for tokens already in the context.
    #[arg(long, value_name = "R", default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed for sampling (default: a fresh one each run).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Print token counts and speed to stderr.
    #[arg(long, short)]
    verbose: bool,
}

pub(super) fn warn_unsigned(args: &RunModelArgs) {
    if args.allow_unsigned {
        eprintln!("warning: --allow-unsigned given: the model's signature will not be required");
    }
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness; enough for a sampling seed (not a secret).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

enum Model {
    InProcess(Box<crate::TextModel>),
    Confined(Box<crate::worker::ConfinedModel>),
}

pub fn run(args: RunArgs) -> CmdResult {
    warn_unsigned(&args.common);
    let settings = args.common.worker_settings()?;
    let opened = crate::open(&args.common.model.model, &args.common.open_options()?)?;
    // An embedding model is refused here, before a worker starts.
    opened.require(securerun_models::Task::TextGeneration)?;
    let mut model = match settings {
        None => Model::InProcess(Box::new(opened.text_model()?)),
        Some(settings) => Model::Confined(Box::new(opened.confined(settings)?)),
    };
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        Prompt::Chat(messages)
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed.unwrap_or_else(fresh_seed),
            ..SamplingParams::default()
        },
        stop: args.stop.clone(),
        ..GenerationParams::default()
    };
    let stdout = std::io::stdout();
    let tty = stdout.is_terminal();
    let mut out = stdout.lock();
    let mut write_error = None;
    let mut on_text = |piece: &str| match out.write_all(piece.as_bytes()).and_then(|_| out.flush())
    {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            write_error = Some(e);
            ControlFlow::Break(())
        }
    };
    let generation = match &mut model {
        Model::InProcess(m) => m.generate(&prompt, &params, &mut on_text)?,
        Model::Confined(m) => m.generate(&prompt, &params, &mut on_text)?,
    };
    if let Some(e) = write_error {
        return Err(format!("cannot write to stdout: {e}").into());
    }
    if tty {
        writeln!(out)?;
    }
    if args.verbose {
        let decode_s = generation.decode_time.as_secs_f64();
        let prefill_s = generation.prefill_time.as_secs_f64();
        eprintln!(
            "prompt {} tokens ({:.1} tok/s), generated {} tokens ({:.1} tok/s), finish: {}",
            generation.prompt_tokens,
            generation.prompt_tokens as f64 / prefill_s.max(1e-9),
            generation.completion_tokens(),
            generation.completion_tokens().saturating_sub(1) as f64 / decode_s.max(1e-9),
            generation.finish_reason.as_str()
        );
    }
    Ok(())
}

impl RunArgs {
    pub(super) fn threads(&self) -> Option<u16> {
        self.common.threads
    }
}
