//! securerun: a self-contained, secure, on-device inference runtime.
//!
//! As a library, securerun loads a model with the same strict checks as the `securerun` binary and
//! runs it in process: generate text with a token stream, or embed sentences.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use securerun::{open_text_model, GenerationParams, OpenOptions, Prompt};
//!
//! let opts = OpenOptions {
//!     trust: securerun::signing::TrustPolicy::keys(vec![securerun::signing::PublicKey::from_pem(
//!         &std::fs::read_to_string("site.pub")?,
//!     )?]),
//!     ..Default::default()
//! };
//! // Refuses an unsigned, tampered or untrusted model before a single weight is used.
//! let mut model = open_text_model("models/smollm2".as_ref(), &opts)?;
//! let out = model.generate(
//!     &Prompt::Text("The capital of France is".into()),
//!     &GenerationParams { max_tokens: 16, ..Default::default() },
//!     &mut |piece| { print!("{piece}"); ControlFlow::Continue(()) },
//! )?;
//! println!("\n[{} tokens, finish: {}]", out.completion_tokens(), out.finish_reason.as_str());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod audit;
pub mod cli;
pub mod lockdown;
mod open;
pub mod reload;
pub mod server;
pub mod signing;
pub mod state_dir;
pub mod tokens;
pub mod worker;

pub use open::{
    open, open_embedder, open_text_model, DeviceChoice, Error, OpenOptions, OpenedModel,
};
pub mod trust;
pub use securerun_models as models;
pub use securerun_models::{
    ChatMessage, Embedder, FinishReason, Generation, GenerationParams, Limits, Prompt,
    SamplingParams, TextModel,
};
