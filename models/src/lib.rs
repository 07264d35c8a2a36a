//! securerun's model core: strict safetensors loading, model resolution, architectures,
//! tokenizers, chat templates and generation, on top of candle.
//!
//! This crate knows nothing of HTTP, access tokens or audit; the `securerun` runtime builds those
//! around it.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use std::sync::Arc;
//! use securerun_models::{LoadOptions, ModelSource, Prompt, GenerationParams, TextModel};
//!
//! let opts = LoadOptions::default();
//! let source = Arc::new(ModelSource::open("model-dir".as_ref(), &opts.limits)?);
//! let mut model = TextModel::load(&source, &opts)?;
//! let out = model.generate(
//!     &Prompt::Text("The capital of France is".into()),
//!     &GenerationParams { max_tokens: 16, ..Default::default() },
//!     &mut |piece| { print!("{piece}"); ControlFlow::Continue(()) },
//! )?;
//! eprintln!("\n{} tokens, {}", out.completion_tokens(), out.finish_reason.as_str());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod arch;
pub mod batch;
pub mod budget;
pub mod chat;
pub mod cuda;
pub mod decoder;
pub mod detok;
pub mod embed;
pub mod encoder;
pub mod fsutil;
pub mod generate;
pub mod grammar;
pub mod inspect;
pub mod kernels;
pub mod load;
pub mod pack;
mod panic_guard;
pub mod precision;
pub mod prompt;
pub mod sampling;
pub mod source;
pub mod stop;
pub mod strict_safetensors;
pub mod tokenizer;
pub mod tools;
mod weights;

pub use arch::{Architecture, Task};
pub use batch::{Batch, BatchLimits, Finished, PrefixKey};
pub use candle_core::{DType, Device};
pub use chat::ChatMessage;
pub use embed::{EmbedError, EmbedInput, Embedder};
pub use generate::{
    FinishReason, GenerateError, Generation, GenerationParams, Prompt, Score, TextModel,
    TokenLogprob, MAX_TOP_LOGPROBS,
};
pub use load::{LoadError, LoadOptions};
pub use precision::Precision;
pub use prompt::{ChatPlan, PromptEncoder};
pub use sampling::SamplingParams;
pub use source::{ModelSource, SourceError};
pub use strict_safetensors::Limits;

/// Detects what kind of model a source holds (needs its config.json).
pub fn detect(source: &ModelSource) -> Result<Architecture, LoadError> {
    Ok(Architecture::detect(&load::config(source)?)?)
}
