//! Continuous batching: several generations advance together, one forward pass per step over
//! all of them, so the weights are read once per step instead of once per sequence.
//!
//! Each step feeds every running sequence its last sampled token and, with the step's token
//! budget left, the next chunk of each waiting prompt (shared, shortest first): new requests
//! are prefilled in chunks between decode steps instead of stalling them. A sequence that ends
//! (stop, length, cancelled by its callback or by [`Batch::cancel`]) leaves at once and its
//! slot takes the next request. Every sequence's tokens are those it would get alone: the
//! decoder keeps each row's arithmetic independent of the rest of the batch, and sampling state
//! is per sequence ([`crate::generate`]'s `SeqState`, the single-stream loop's own).
//!
//! **Prefix reuse.** A finished sequence's cache is kept (its memory is needed for the next
//! sequence anyway) together with the tokens it holds and the [`PrefixKey`] of whoever fed
//! them. A new sequence with the same key takes the kept cache that shares the longest prefix
//! with its prompt and feeds only the rest: a system prompt or a chat history is computed once.
//! Because every row's arithmetic is independent of the others (above), the reused keys and
//! values are bit for bit those a fresh prefill would compute, so reuse never changes a token.
//! It does change timing, so a cache is only reused under the key that filled it: a client
//! cannot learn from its time to first token what another key's clients asked. Memory is
//! bounded by the batch's own: at most `max_sequences` caches exist, running or kept.

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};

use crate::decoder::tensor::{TensorDecoder, TensorSequence};
use crate::decoder::{Chunk, Decoder, Sequence};
use crate::generate::{GenerateError, Generation, GenerationParams, SeqState, TextModel};

/// How much a batch takes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sequences generating at once (each holds its own KV cache).
    pub max_sequences: usize,
    /// Tokens one step feeds (decode steps first, then prompt chunks); at least
    /// `max_sequences`, so every running sequence advances every step.
    pub max_step_tokens: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_sequences: 8,
            max_step_tokens: 256,
        }
    }
}

/// Whose prompts a kept cache may serve (the server derives it from the access token). Caches
/// are only shared between sequences with equal keys; a sequence without a key neither reuses
/// nor leaves a cache for reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixKey(pub u64);

/// A text callback: gets each piece of a sequence's text; `Break` cancels that sequence.
pub type OnText<'cb> = Box<dyn FnMut(&str) -> ControlFlow<()> + Send + 'cb>;

/// A sequence that left the batch.
pub struct Finished {
    pub id: u64,
    pub result: Result<Generation, GenerateError>,
}

struct Slot<'cb> {
    id: u64,
    state: SeqState,
    seq: Cache,
    key: Option<PrefixKey>,
    /// The tokens whose keys and values `seq` holds (positions `0..pos`).
    fed: Vec<u32>,
    /// Prompt tokens taken from a kept cache.
    cached: usize,
    /// Tokens to feed next: the rest of the prompt, or the last sampled token.
    pending: Vec<u32>,
    /// The position of `pending[0]`.
    pos: usize,
    prefilled: bool,
    on_text: OnText<'cb>,
}

/// The cache of a sequence that left, with what it holds.
struct Kept {
    seq: Cache,
    key: Option<PrefixKey>,
    tokens: Vec<u32>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The pass a batch runs: the own decoder (CPU), or the same pass on candle tensors (a GPU).
#[derive(Clone, Copy)]
pub(crate) enum Backend<'m> {
    Host(&'m Decoder),
    Tensor(&'m TensorDecoder),
}

/// One sequence's KV cache, of its backend's kind.
enum Cache {
    Host(Sequence),
    Tensor(TensorSequence),
}

impl Backend<'_> {
    /// Token ids the model has (its embedding rows).
    fn vocab(self) -> usize {
        match self {
            Backend::Host(d) => d.shape().vocab,
            Backend::Tensor(d) => d.shape().vocab,
        }
    }

    fn new_cache(self) -> Cache {
        match self {
            Backend::Host(d) => Cache::Host(d.new_sequence()),
            Backend::Tensor(d) => Cache::Tensor(d.new_sequence()),
        }
    }

    /// `dst` holds the first `len` positions of `src`.
    fn copy_prefix(self, dst: &mut Cache, src: &Cache, len: usize) -> Result<(), GenerateError> {
        match (self, dst, src) {
            (Backend::Host(_), Cache::Host(d), Cache::Host(s)) => {
                d.copy_prefix(s, len);
                Ok(())
            }
            (Backend::Tensor(t), Cache::Tensor(d), Cache::Tensor(s)) => {
                t.copy_prefix(d, s, len).map_err(GenerateError::from)
            }
            _ => Err(mixed_caches()),
        }
    }
}

/// Caches are only ever made by their batch's backend; a mix would be this module's bug.
fn mixed_caches() -> GenerateError {
    GenerateError::Compute("a cache of another backend in the batch".into())
}

/// Generations of one model advancing together.
pub struct Batch<'m, 'cb> {
    model: &'m TextModel,
    decoder: Backend<'m>,
    limits: BatchLimits,
    slots: Vec<Slot<'cb>>,
    /// Caches of finished sequences, oldest first, kept for the next ones (their memory and,
    /// under the same key, their prefix reused).
    spare: Vec<Kept>,
    next_id: u64,
}

impl<'m, 'cb> Batch<'m, 'cb> {
    /// A batch over `model`, which must run on the project's decoder or its pass on candle
    /// tensors (a GPU's).
    pub fn new(model: &'m TextModel, limits: BatchLimits) -> Result<Self, GenerateError> {
        let decoder = model.backend().ok_or(GenerateError::Unbatched)?;
        if limits.max_sequences == 0 || limits.max_step_tokens < limits.max_sequences {
            return Err(GenerateError::Params(format!(
                "a batch needs at least one sequence and a step of at least as many tokens ({limits:?})"
            )));
        }
        Ok(Batch {
            model,
            decoder,
            limits,
            slots: Vec::new(),
            spare: Vec::new(),
            next_id: 0,
        })
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Sequences whose prompt is still being fed.
    pub fn prefilling(&self) -> usize {
        self.slots.iter().filter(|s| !s.prefilled).count()
    }

    /// Whether another sequence fits.
    pub fn has_room(&self) -> bool {
        self.slots.len() < self.limits.max_sequences
    }

    /// Adds a generation; it starts with the next step. With a `key`, the longest prefix of the
    /// prompt that a kept cache of the same key holds is not computed again. Refused when the
    /// request is invalid (as [`TextModel::generate_from_ids`] would) or the batch is full.
    pub fn add(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        key: Option<PrefixKey>,
        on_text: OnText<'cb>,
    ) -> Result<u64, GenerateError> {
        if !self.has_room() {
            return Err(GenerateError::BatchFull);
        }
        let state = self.model.seq_state(prompt_ids, params)?;
        let prompt = state.prompt();
        // Checked here, not only by the pass: an id the tokenizer knows but the model has no
        // row for (a tokenizer with more added tokens than `vocab_size`) would otherwise fail
        // the whole step, every other request of the batch with it.
        let vocab = self.decoder.vocab();
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(GenerateError::Params(format!(
                "prompt token {t} is outside the model's vocabulary ({vocab})"
            )));
        }
        // The kept cache of this key sharing the longest prefix; else the oldest kept one.
        // The last prompt token is always fed: its logits give the first token.
        let donor = key.and_then(|key| {
            self.spare
                .iter()
                .enumerate()
                .filter(|(_, k)| k.key == Some(key))
                .map(|(i, k)| (i, common_prefix(&k.tokens, prompt).min(prompt.len() - 1)))
                .filter(|&(_, n)| n > 0)
                .max_by_key(|&(i, n)| (n, i))
        });
        let (seq, cached) = match donor {
            // Used up to its end: the new sequence goes on in the donor's own cache.
            Some((i, n)) if n == self.spare[i].tokens.len() => (self.spare.remove(i).seq, n),
            // A part of it (a system prompt shared by different questions): copied, so the
            // donor stays for the next request that shares more of it, unless no other cache
            // may exist (then the donor is taken).
            Some((i, n)) => {
                let donor = self.spare.remove(i);
                match self.other_cache(1) {
                    Some(mut seq) => {
                        let copied = self.decoder.copy_prefix(&mut seq, &donor.seq, n);
                        self.spare.push(donor); // the most recently used
                        match copied {
                            Ok(()) => (seq, n),
                            // No room on the device for the copy: computed afresh.
                            Err(_) => (seq, 0),
                        }
                    }
                    None => (donor.seq, n),
                }
            }
            None => {
                let seq = self.other_cache(0);
                (seq.unwrap_or_else(|| self.decoder.new_cache()), 0)
            }
        };
        let mut fed = Vec::with_capacity(prompt.len());
        fed.extend_from_slice(&prompt[..cached]);
        let id = self.next_id;
        self.next_id += 1;
        self.slots.push(Slot {
            id,
            pending: prompt[cached..].to_vec(),
            state,
            seq,
            key,
            fed,
            cached,
            pos: cached,
            prefilled: false,
            on_text,
        });
        Ok(id)
    }

    /// Ends sequence `id` now (its client went away): what it generated so far, finish reason
    /// `Cancelled`. `None` if it is not in the batch.
    pub fn cancel(&mut self, id: u64) -> Option<Generation> {
        let i = self.slots.iter().position(|s| s.id == id)?;
        let (state, cached, _) = self.leave(i);
        let mut g = state.cancelled();
        g.cached_tokens = cached;
        Some(g)
    }

    /// A cache for a new sequence besides the `held` ones taken out of `spare`: a new one while
    /// fewer than `max_sequences` exist, else the least recently used spare.
    fn other_cache(&mut self, held: usize) -> Option<Cache> {
        if self.slots.len() + self.spare.len() + held < self.limits.max_sequences {
            Some(self.decoder.new_cache())
        } else if self.spare.is_empty() {
            None
        } else {
            Some(self.spare.remove(0).seq)
        }
    }

    /// Takes slot `i` out of the batch, keeping its cache for the next sequences (newest
    /// last): its sampling state, cached prompt tokens and callback.
    fn leave(&mut self, i: usize) -> (SeqState, usize, OnText<'cb>) {
        let slot = self.slots.remove(i);
        self.spare.push(Kept {
            seq: slot.seq,
            key: slot.key,
            tokens: slot.fed,
        });
        (slot.state, slot.cached, slot.on_text)
    }

    /// One forward pass over the batch; returns the sequences that ended in it. An error of
    /// the pass itself leaves every sequence where it was.
    pub fn step(&mut self) -> Result<Vec<Finished>, GenerateError> {
        // Decode steps first (one token each), then prompt chunks.
        let mut budget = self.limits.max_step_tokens;
        let mut take = vec![0usize; self.slots.len()];
        for (t, s) in take.iter_mut().zip(&self.slots) {
            if s.prefilled {
                *t = 1;
                budget -= 1;
            }
        }
        // Prompt chunks share what is left, shortest prompt first: each waiting prompt gets
        // an even share (a short one all of its tokens), so a prompt that arrives behind a long
        // prefill starts within a step instead of after it; the long one takes what the others
        // leave. Chunking never changes a sequence's tokens.
        let mut waiting: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !self.slots[i].prefilled)
            .collect();
        waiting.sort_by_key(|&i| self.slots[i].pending.len());
        let mut left = waiting.len();
        for i in waiting {
            let share = (budget / left).max(1);
            take[i] = self.slots[i].pending.len().min(share).min(budget);
            budget -= take[i];
            left -= 1;
        }
        if take.iter().all(|&n| n == 0) {
            return Ok(Vec::new());
        }
        let logits = match self.decoder {
            Backend::Host(decoder) => {
                let mut chunks = chunks(&mut self.slots, &take, |c| match c {
                    Cache::Host(seq) => Some(seq),
                    Cache::Tensor(_) => None,
                })?;
                crate::panic_guard::catch(|| decoder.forward_batch(&mut chunks))
                    .map_err(panicked)?
                    .map_err(GenerateError::Compute)?
            }
            Backend::Tensor(decoder) => {
                let mut chunks = chunks(&mut self.slots, &take, |c| match c {
                    Cache::Tensor(seq) => Some(seq),
                    Cache::Host(_) => None,
                })?;
                crate::panic_guard::catch(|| decoder.forward_batch(&mut chunks))
                    .map_err(panicked)?
                    .map_err(GenerateError::from)?
            }
        };
        let tokenizer = self.model.tokenizer();
        let eos = self.model.eos_ids();
        let mut logits = logits.into_iter();
        let mut ended = Vec::new();
        for (i, &n) in take.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let row = logits.next().expect("one row of logits per chunk");
            let s = &mut self.slots[i];
            s.fed.extend(s.pending.drain(..n));
            s.pos += n;
            if !s.pending.is_empty() {
                continue; // more of the prompt to come
            }
            if !s.prefilled {
                s.prefilled = true;
                s.state.prefilled();
            }
            let len = row.len();
            let next = Tensor::from_vec(row, len, &Device::Cpu)
                .map_err(GenerateError::from)
                .and_then(|t| s.state.advance(t, tokenizer, eos, &mut *s.on_text));
            match next {
                Ok(Some(token)) => s.pending.push(token),
                Ok(None) => ended.push((i, Ok(()))),
                Err(e) => ended.push((i, Err(e))),
            }
        }
        let mut finished = Vec::with_capacity(ended.len());
        for (i, outcome) in ended.into_iter().rev() {
            let id = self.slots[i].id;
            let (state, cached, mut on_text) = self.leave(i);
            let result = match outcome {
                Ok(()) => state.finish(tokenizer, &mut *on_text),
                Err(e) => Err(e),
            };
            let result = result.map(|mut g| {
                g.cached_tokens = cached;
                g
            });
            finished.push(Finished { id, result });
        }
        finished.reverse();
        Ok(finished)
    }
}

fn panicked(panic: String) -> GenerateError {
    GenerateError::Compute(format!("model code panicked: {panic}"))
}

/// The step's chunks: `take[i]` pending tokens of slot `i` (none: the slot sits this step
/// out), each with its cache as the backend's kind (`cache` picks it).
fn chunks<'s, S>(
    slots: &'s mut [Slot<'_>],
    take: &[usize],
    cache: impl Fn(&mut Cache) -> Option<&mut S>,
) -> Result<Vec<Chunk<'s, S>>, GenerateError> {
    let mut out = Vec::new();
    for (s, &n) in slots.iter_mut().zip(take) {
        if n == 0 {
            continue;
        }
        out.push(Chunk {
            seq: cache(&mut s.seq).ok_or_else(mixed_caches)?,
            tokens: &s.pending[..n],
            pos: s.pos,
        });
    }
    Ok(out)
}
