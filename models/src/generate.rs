//! Text generation: prompt rendering and tokenization, the decode loop with KV cache, stop
//! conditions, and token-by-token streaming.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;

use crate::arch::{self, Architecture, CausalLm};
use crate::chat::{ChatError, ChatMessage};
use crate::detok::Detokenizer;
use crate::load::{self, LoadError, LoadOptions};
use crate::prompt::PromptEncoder;
use crate::sampling::SamplingParams;
use crate::source::ModelSource;
use crate::stop::{StopMatcher, StopScan};
use crate::tokenizer::TokenizerError;

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized with the tokenizer's own special tokens (e.g. a BOS).
    Text(String),
    /// Chat messages, rendered with the model's chat template plus the assistant turn opener.
    Chat(Vec<ChatMessage>),
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings; the string itself is not returned.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks use this for fixed-length runs).
    pub ignore_eos: bool,
    /// Refuse prompts longer than this (a server's cap, below the model's context).
    #[serde(default)]
    pub max_prompt_tokens: Option<usize>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            max_prompt_tokens: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` (or the model's context) was reached.
    Length,
    /// The streaming callback asked to stop (e.g. the client went away).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    pub fn completion_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("invalid generation parameters: {0}")]
    Params(String),
    #[error("the prompt is empty after tokenization")]
    EmptyPrompt,
    #[error("the prompt has {prompt_tokens} tokens; the model's context holds {max_context}")]
    PromptTooLong {
        prompt_tokens: usize,
        max_context: usize,
    },
    #[error("model computation failed: {0}")]
    Compute(String),
}

impl From<candle_core::Error> for GenerateError {
    fn from(e: candle_core::Error) -> Self {
        GenerateError::Compute(e.to_string())
    }
}

/// How well a model predicts a text, token by token (teacher forcing).
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Per predicted token (`ids[1..]`): −log p(token | everything before), in nats.
    pub nll: Vec<f64>,
    /// Per predicted token: the model's most likely token at that position.
    pub top1: Vec<u32>,
}

impl Score {
    /// exp(mean negative log-likelihood).
    pub fn perplexity(&self) -> f64 {
        if self.nll.is_empty() {
            return f64::NAN;
        }
        (self.nll.iter().sum::<f64>() / self.nll.len() as f64).exp()
    }

    /// Fraction of positions whose most likely token equals `other`'s.
    pub fn top1_agreement(&self, other: &Score) -> f64 {
        let n = self.top1.len().min(other.top1.len());
        if n == 0 {
            return f64::NAN;
        }
        let same = (0..n).filter(|&i| self.top1[i] == other.top1[i]).count();
        same as f64 / n as f64
    }
}

/// A loaded text-generation model with its tokenizer and chat template.
pub struct TextModel {
    arch: Architecture,
    lm: Box<dyn CausalLm>,
    encoder: PromptEncoder,
    eos: Vec<u32>,
}

impl TextModel {
    /// Builds the model from a resolved source.
    pub fn load(source: &Arc<ModelSource>, opts: &LoadOptions) -> Result<Self, LoadError> {
        let parts = load::common(source, opts)?;
        let lm = arch::load_causal_lm(parts.arch, &parts.config, source, opts, parts.dtype)?;
        let eos = load::eos_ids(source, &parts.tokenizer);
        Ok(TextModel {
            arch: parts.arch,
            lm,
            encoder: PromptEncoder::new(parts.tokenizer, source),
            eos,
        })
    }

    /// Scores `ids` (at least two tokens, within the context): every token after the first is
    /// predicted from the ones before it, in chunks of `chunk` positions.
    pub fn score(&mut self, ids: &[u32], chunk: usize) -> Result<Score, GenerateError> {
        if ids.len() < 2 {
            return Err(GenerateError::EmptyPrompt);
        }
        let max_context = self.lm.max_context();
        if ids.len() > max_context {
            return Err(GenerateError::PromptTooLong {
                prompt_tokens: ids.len(),
                max_context,
            });
        }
        self.lm.reset();
        let inputs = &ids[..ids.len() - 1];
        let mut score = Score {
            nll: Vec::with_capacity(inputs.len()),
            top1: Vec::with_capacity(inputs.len()),
        };
        let mut pos = 0;
        for piece in inputs.chunks(chunk.max(1)) {
            let logits = match crate::panic_guard::catch(|| self.lm.forward_all(piece, pos)) {
                Ok(r) => r?,
                Err(panic) => return Err(GenerateError::Compute(panic)),
            };
            let vocab = logits.len() / piece.len();
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let target = ids[pos + i + 1] as usize;
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lse =
                    (row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>()).ln() + max as f64;
                let logit = row.get(target).copied().unwrap_or(f32::NEG_INFINITY) as f64;
                score.nll.push(lse - logit);
                let best = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (j, &v)| if v > b.1 { (j, v) } else { b },
                    );
                score.top1.push(best.0 as u32);
            }
            pos += piece.len();
        }
        self.lm.reset();
        Ok(score)
    }

    pub fn architecture(&self) -> Architecture {
        self.arch
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.encoder.tokenizer()
    }

    /// The tokenizer and chat template alone.
    pub fn encoder(&self) -> &PromptEncoder {
        &self.encoder
    }

    /// End-of-sequence token ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn max_context(&self) -> usize {
        self.lm.max_context()
    }

    /// Renders chat messages to the exact prompt text the model sees.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, GenerateError> {
        self.encoder.render_chat(messages)
    }

    /// Tokenizes a prompt the way transformers does: raw text with the tokenizer's special
    /// tokens, chat text without (the template already contains them).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, GenerateError> {
        self.encoder.prompt_ids(prompt)
    }

    /// Generates, calling `on_text` with each complete piece of text as soon as it is known
    /// (never a partial UTF-8 character, never part of a stop string). Returning
    /// `ControlFlow::Break` from `on_text` cancels generation.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        let ids = self.prompt_ids(prompt)?;
        self.generate_from_ids(&ids, params, on_text)
    }

    /// Like [`Self::generate`], from already tokenized input.
    pub fn generate_from_ids(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        params.sampling.validate().map_err(GenerateError::Params)?;
        if prompt_ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let max_context = self.lm.max_context();
        if let Some(cap) = params
            .max_prompt_tokens
            .filter(|&cap| prompt_ids.len() > cap)
        {
            return Err(GenerateError::PromptTooLong {
                prompt_tokens: prompt_ids.len(),
                max_context: cap,
            });
        }
        if prompt_ids.len() >= max_context {
            return Err(GenerateError::PromptTooLong {
                prompt_tokens: prompt_ids.len(),
                max_context,
            });
        }
        let budget = params.max_tokens.min(max_context - prompt_ids.len());

        let mut run = Run {
            context: prompt_ids.to_vec(),
            text: String::new(),
            detok: Detokenizer::new(),
            stop: StopMatcher::new(&params.stop),
        };
        let mut sampler = params.sampling.processor();
        self.lm.reset();
        let started = Instant::now();
        let mut logits = arch::forward_guarded(self.lm.as_mut(), prompt_ids, 0)?;
        let prefill_time = started.elapsed();
        let decode_started = Instant::now();
        let mut finish = FinishReason::Length;
        let mut by_stop_string = false;
        let mut generated = 0;
        while generated < budget {
            let logits_now = params.sampling.penalize(logits, &run.context)?;
            let next = sampler.sample(&logits_now)?;
            if !params.ignore_eos && self.eos.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            run.context.push(next);
            generated += 1;
            if let Some(piece) = run.detok.push(self.encoder.tokenizer(), next)? {
                if let Step::Stop(reason) = run.emit(&piece, on_text) {
                    finish = reason;
                    by_stop_string = reason == FinishReason::Stop;
                    break;
                }
            }
            if generated == budget {
                break;
            }
            logits = arch::forward_guarded(self.lm.as_mut(), &[next], run.context.len() - 1)?;
        }
        // End of stream: release what the detokenizer and the stop matcher still hold, unless
        // the client cancelled or a stop string already ended the text.
        if finish != FinishReason::Cancelled && !by_stop_string {
            if let Some(rest) = run.detok.flush(self.encoder.tokenizer())? {
                if let Step::Stop(reason) = run.emit(&rest, on_text) {
                    finish = reason;
                    by_stop_string = reason == FinishReason::Stop;
                }
            }
        }
        if finish != FinishReason::Cancelled && !by_stop_string {
            let held = run.stop.finish();
            if !held.is_empty() {
                run.text.push_str(&held);
                let _ = on_text(&held);
            }
        }
        Ok(Generation {
            text: run.text,
            token_ids: run.context[prompt_ids.len()..].to_vec(),
            prompt_tokens: prompt_ids.len(),
            finish_reason: finish,
            prefill_time,
            decode_time: decode_started.elapsed(),
        })
    }
}

/// Per-generation state.
struct Run {
    context: Vec<u32>,
    text: String,
    detok: Detokenizer,
    stop: StopMatcher,
}

enum Step {
    Go,
    Stop(FinishReason),
}

impl Run {
    /// Passes decoded text through the stop matcher to the caller.
    fn emit(&mut self, piece: &str, on_text: &mut dyn FnMut(&str) -> ControlFlow<()>) -> Step {
        let (out, stopped) = match self.stop.feed(piece) {
            StopScan::Continue(out) => (out, false),
            StopScan::Stopped(out) => (out, true),
        };
        if !out.is_empty() {
            self.text.push_str(&out);
            if on_text(&out).is_break() {
                return Step::Stop(FinishReason::Cancelled);
            }
        }
        if stopped {
            Step::Stop(FinishReason::Stop)
        } else {
            Step::Go
        }
    }
}
