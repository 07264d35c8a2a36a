//! Text generation: prompt rendering and tokenization, the decode loop with KV cache, stop
//! conditions, and token-by-token streaming.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;

use crate::arch::{self, Architecture, CausalLm};
use crate::chat::{ChatError, ChatMessage};
use crate::detok::Detokenizer;
use crate::grammar::{Constraint, GrammarEnv, GrammarError, OutputGrammar};
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
    /// What the output must match (JSON, a schema, a tool call): see [`crate::grammar`].
    #[serde(default)]
    pub grammar: Option<OutputGrammar>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`: −100 bans, +100
    /// all but forces).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Return each generated token's log-probability and the `n` most likely alternatives
    /// (`Some(0)`: the token's own only; at most [`MAX_TOP_LOGPROBS`]).
    #[serde(default)]
    pub logprobs: Option<usize>,
}

/// The most alternatives a token's log-probabilities list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability under the distribution it was sampled from (after
/// penalties, biases and the grammar's mask; before temperature), with the most likely
/// alternatives, most likely first.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            max_prompt_tokens: None,
            grammar: None,
            logit_bias: Vec::new(),
            logprobs: None,
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
    /// Prompt tokens whose keys and values came from a cached prefix instead of being computed
    /// (see [`crate::batch`]); never all of them, the last one is always fed.
    pub cached_tokens: usize,
    pub finish_reason: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Per generated token, when asked for ([`GenerationParams::logprobs`]).
    pub logprobs: Vec<TokenLogprob>,
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
    /// Batched generation needs the project's decoder; this architecture runs on the
    /// candle-transformers reference, one sequence at a time.
    #[error("this model's architecture runs one sequence at a time")]
    Unbatched,
    /// Every slot of the batch is taken.
    #[error("the batch is full")]
    BatchFull,
    /// A message spells one of the model's control tokens, and the chat template does not
    /// keep message contents whole, so they cannot be kept as text ([`crate::prompt::ChatPlan`]).
    #[error("a message contains the text of one of the model's control tokens, and this model's chat template rewrites message contents, so it cannot be kept as plain text")]
    ContentNotKept,
    #[error(transparent)]
    Grammar(#[from] GrammarError),
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
    source: Arc<ModelSource>,
    /// Logits per position (config.json's `vocab_size`; bounded there).
    vocab: usize,
    /// The tokenizer as the grammar engine sees it: built at the first constrained request.
    grammar: std::sync::OnceLock<Result<GrammarEnv, GrammarError>>,
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
            source: source.clone(),
            vocab: parts
                .config
                .get("vocab_size")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0) as usize,
            grammar: std::sync::OnceLock::new(),
        })
    }

    /// The state of one generation from `prompt_ids`, its grammar compiled (if it has one).
    pub(crate) fn seq_state(
        &self,
        prompt_ids: &[u32],
        params: &GenerationParams,
    ) -> Result<SeqState, GenerateError> {
        let constraint = match &params.grammar {
            None => None,
            Some(grammar) => {
                grammar.check()?;
                let env = self.grammar.get_or_init(|| {
                    let json = self
                        .source
                        .aux("tokenizer.json")
                        .ok_or_else(|| GrammarError::Tokenizer("no tokenizer.json".into()))?;
                    GrammarEnv::new(json, self.vocab, &self.eos)
                });
                let env = env
                    .as_ref()
                    .map_err(|e| GenerateError::Grammar(e.clone()))?;
                Some(env.constraint(grammar)?)
            }
        };
        SeqState::new(prompt_ids, params, self.lm.max_context(), constraint)
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

    /// [`Self::render_chat`] with the tools the model may call.
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<String, GenerateError> {
        self.encoder.render_chat_with_tools(messages, tools)
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
        let mut state = self.seq_state(prompt_ids, params)?;
        self.lm.reset();
        let mut logits = arch::forward_guarded(self.lm.as_mut(), prompt_ids, 0)?;
        state.prefilled();
        let tokenizer = self.encoder.tokenizer();
        while let Some(next) = state.advance(logits, tokenizer, &self.eos, on_text)? {
            logits = arch::forward_guarded(self.lm.as_mut(), &[next], state.context_len() - 1)?;
        }
        state.finish(tokenizer, on_text)
    }

    /// The batched pass behind this model, if it has one (the own decoder, or its pass on
    /// candle tensors): batched generation needs it.
    pub(crate) fn backend(&self) -> Option<crate::batch::Backend<'_>> {
        use crate::batch::Backend;
        self.lm
            .decoder()
            .map(Backend::Host)
            .or_else(|| self.lm.tensor_decoder().map(Backend::Tensor))
    }
}

/// One generation's state between forward passes: what the single-stream loop above and a
/// [`crate::batch::Batch`] both drive, so a request gives the same tokens either way.
pub(crate) struct SeqState {
    params: GenerationParams,
    sampler: candle_transformers::generation::LogitsProcessor,
    constraint: Option<Constraint>,
    /// How often each token was generated (for presence and frequency penalties).
    counts: std::collections::HashMap<u32, u32>,
    logprobs: Vec<TokenLogprob>,
    run: Run,
    prompt_len: usize,
    budget: usize,
    generated: usize,
    finish: FinishReason,
    by_stop_string: bool,
    started: Instant,
    prefill_time: Duration,
    decode_started: Instant,
}

impl SeqState {
    /// Checks the request against the model's context; the state waits for the prompt's logits.
    pub(crate) fn new(
        prompt_ids: &[u32],
        params: &GenerationParams,
        max_context: usize,
        constraint: Option<Constraint>,
    ) -> Result<Self, GenerateError> {
        params.sampling.validate().map_err(GenerateError::Params)?;
        if params.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(GenerateError::Params(format!(
                "at most {MAX_TOP_LOGPROBS} alternatives per token"
            )));
        }
        if let Some((id, bias)) = params
            .logit_bias
            .iter()
            .find(|(_, b)| !b.is_finite() || !(-100.0..=100.0).contains(b))
        {
            return Err(GenerateError::Params(format!(
                "logit_bias for token {id} must be in [-100, 100], got {bias}"
            )));
        }
        if prompt_ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
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
        let now = Instant::now();
        Ok(SeqState {
            params: params.clone(),
            sampler: params.sampling.processor(),
            constraint,
            counts: std::collections::HashMap::new(),
            logprobs: Vec::new(),
            run: Run {
                context: prompt_ids.to_vec(),
                text: String::new(),
                detok: Detokenizer::new(),
                stop: StopMatcher::new(&params.stop),
            },
            prompt_len: prompt_ids.len(),
            budget: params.max_tokens.min(max_context - prompt_ids.len()),
            generated: 0,
            finish: FinishReason::Length,
            by_stop_string: false,
            started: now,
            prefill_time: Duration::ZERO,
            decode_started: now,
        })
    }

    /// The prompt and the tokens generated so far.
    pub(crate) fn context_len(&self) -> usize {
        self.run.context.len()
    }

    pub(crate) fn prompt(&self) -> &[u32] {
        &self.run.context[..self.prompt_len]
    }

    /// The prompt's logits have arrived.
    pub(crate) fn prefilled(&mut self) {
        self.prefill_time = self.started.elapsed();
        self.decode_started = Instant::now();
    }

    /// Takes the logits after the last token fed: samples the next token and streams its text.
    /// Returns the token to feed next, or `None` when the generation has ended.
    pub(crate) fn advance(
        &mut self,
        logits: candle_core::Tensor,
        tokenizer: &Tokenizer,
        eos: &[u32],
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Option<u32>, GenerateError> {
        if self.generated >= self.budget {
            return Ok(None);
        }
        let logits = self.params.sampling.penalize(logits, &self.run.context)?;
        let logits = self.shape(logits)?;
        let next = self.sampler.sample(&logits)?;
        let at_eos = eos.contains(&next);
        if let Some(n) = self.params.logprobs {
            if !at_eos || self.params.ignore_eos {
                self.logprobs
                    .push(token_logprob(&logits.to_vec1::<f32>()?, next, n));
            }
        }
        if let Some(c) = &mut self.constraint {
            // End-of-sequence is in the mask only where the output is complete.
            if !at_eos {
                c.consume(next)?;
            }
        }
        if at_eos && (!self.params.ignore_eos || self.constraint.is_some()) {
            self.finish = FinishReason::Stop;
            return Ok(None);
        }
        self.run.context.push(next);
        self.generated += 1;
        *self.counts.entry(next).or_default() += 1;
        let complete = self
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_complete);
        if let Some(piece) = self.run.detok.push(tokenizer, next)? {
            if let Step::Stop(reason) = self.run.emit(&piece, on_text) {
                self.finish = reason;
                self.by_stop_string = reason == FinishReason::Stop;
                return Ok(None);
            }
        }
        if complete {
            self.finish = FinishReason::Stop;
            return Ok(None);
        }
        if self.generated == self.budget {
            return Ok(None);
        }
        Ok(Some(next))
    }

    /// Applies what works on the logits row itself: presence and frequency penalties over the
    /// generated tokens (OpenAI's definitions), `logit_bias`, and the grammar's mask. A request
    /// that asks for none of them keeps the tensor as it came.
    fn shape(&mut self, logits: candle_core::Tensor) -> Result<candle_core::Tensor, GenerateError> {
        let s = &self.params.sampling;
        let penalties = s.presence_penalty != 0.0 || s.frequency_penalty != 0.0;
        if !penalties
            && self.params.logit_bias.is_empty()
            && self.constraint.is_none()
            && self.params.logprobs.is_none()
        {
            return Ok(logits);
        }
        let device = logits.device().clone();
        let mut row = logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        if penalties {
            for (&id, &n) in &self.counts {
                if let Some(l) = row.get_mut(id as usize) {
                    *l -= s.presence_penalty + s.frequency_penalty * n as f32;
                }
            }
        }
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = row.get_mut(id as usize) {
                *l += bias;
            }
        }
        if let Some(c) = &mut self.constraint {
            c.mask(&mut row)?;
            if row.iter().all(|l| *l == f32::NEG_INFINITY) {
                return Err(GrammarError::Step("no token can continue the output".into()).into());
            }
        }
        let n = row.len();
        Ok(candle_core::Tensor::from_vec(row, n, &device)?)
    }

    /// Ends the generation (after `advance` said so, or cancelled): releases what the
    /// detokenizer and the stop matcher still hold, unless the client cancelled or a stop string
    /// already ended the text.
    pub(crate) fn finish(
        mut self,
        tokenizer: &Tokenizer,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        if self.finish != FinishReason::Cancelled && !self.by_stop_string {
            if let Some(rest) = self.run.detok.flush(tokenizer)? {
                if let Step::Stop(reason) = self.run.emit(&rest, on_text) {
                    self.finish = reason;
                    self.by_stop_string = reason == FinishReason::Stop;
                }
            }
        }
        if self.finish != FinishReason::Cancelled && !self.by_stop_string {
            let held = self.run.stop.finish();
            if !held.is_empty() {
                self.run.text.push_str(&held);
                let _ = on_text(&held);
            }
        }
        Ok(self.into_generation())
    }

    /// Ends the generation as cancelled (its client went), with what it produced so far.
    pub(crate) fn cancelled(mut self) -> Generation {
        self.finish = FinishReason::Cancelled;
        self.into_generation()
    }

    fn into_generation(self) -> Generation {
        Generation {
            text: self.run.text,
            token_ids: self.run.context[self.prompt_len..].to_vec(),
            prompt_tokens: self.prompt_len,
            cached_tokens: 0,
            finish_reason: self.finish,
            prefill_time: self.prefill_time,
            decode_time: self.decode_started.elapsed(),
            logprobs: self.logprobs,
        }
    }
}

/// `id`'s log-probability in `row` (logits) and the `n` most likely tokens' (log-softmax in f64).
fn token_logprob(row: &[f32], id: u32, n: usize) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = (row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>()).ln() + max as f64;
    let lp = |i: usize| (row[i] as f64 - lse) as f32;
    let mut top: Vec<usize> = (0..row.len()).collect();
    let n = n.min(row.len());
    if n > 0 && n < top.len() {
        top.select_nth_unstable_by(n - 1, |&a, &b| row[b].total_cmp(&row[a]));
    }
    top.truncate(n);
    top.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    TokenLogprob {
        id,
        logprob: row
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |_| lp(id as usize)),
        // Tokens the grammar forbids have no probability (and JSON has no −∞).
        top: top
            .into_iter()
            .map(|i| (i as u32, lp(i)))
            .filter(|(_, l)| l.is_finite())
            .collect(),
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
