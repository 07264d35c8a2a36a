//! Several requests in flight on one worker channel at once (the worker batches generations).
//!
//! Each request is a stream keyed by its id, with its own checks: text pieces non-empty and at
//! most `max_tokens + 1` of them, bounded text, final counts that agree with what the
//! supervisor sent, its own deadline (past it the worker is told to cancel, and
//! [`CANCEL_GRACE`] later the worker is killed), and no frame for an id that is not in flight.
//! Anything else the worker says breaks the protocol: the worker is replaced and every request
//! in flight fails with the same error (the caller fails what it was waiting on).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use securerun_models::{FinishReason, Generation, GenerationParams, PrefixKey};

use super::{
    kill_after, read_by, write, ConfinedModel, FromWorker, ToWorker, WorkerError, CANCEL_GRACE,
    FRAME_COMPLETE,
};

/// Most frames one [`ConfinedModel::next_events`] call reads before it returns, so the caller
/// gets back to its own checks while a worker talks without pause.
const FRAMES_PER_CALL: usize = 1024;

/// A request in flight in the worker.
pub(super) struct Stream {
    kind: Kind,
    deadline: Option<Instant>,
    cancel_sent: Option<Instant>,
}

enum Kind {
    Generate {
        prompt_tokens: usize,
        max_tokens: usize,
        pieces: usize,
        text: String,
    },
    Render,
}

/// What the worker said about the requests in flight.
#[derive(Debug)]
pub enum Event {
    /// A piece of generation `id`'s text (none arrive after its cancellation).
    Text { id: u64, text: String },
    /// Generation `id` ended; an error is the request's own (the worker stays).
    Generated {
        id: u64,
        result: Result<Generation, WorkerError>,
    },
    /// The rendered chat prompt of request `id`, or the template's error.
    Rendered {
        id: u64,
        result: Result<String, WorkerError>,
    },
}

impl ConfinedModel {
    /// Generations the worker runs at once (1 for an architecture that cannot batch).
    pub fn sequences(&self) -> usize {
        self.sequences
    }

    /// Generations in flight.
    pub fn generations_in_flight(&self) -> usize {
        self.streams
            .values()
            .filter(|s| matches!(s.kind, Kind::Generate { .. }))
            .count()
    }

    /// Whether any request is in flight.
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty()
    }

    /// Sends generation `prompt_ids` to the worker (at most [`Self::sequences`] at once); its
    /// text and end come from [`Self::next_events`]. Past `deadline` it is cancelled. With a
    /// `prefix_key`, it may reuse prefixes cached under the same key.
    pub fn start_generate(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        prefix_key: Option<PrefixKey>,
        deadline: Option<Instant>,
    ) -> Result<u64, WorkerError> {
        let msg = |id| ToWorker::Generate {
            id,
            prompt_ids: prompt_ids.to_vec(),
            params: params.clone(),
            prefix_key: prefix_key.map(|k| k.0),
        };
        let kind = Kind::Generate {
            prompt_tokens: prompt_ids.len(),
            max_tokens: params.max_tokens,
            pieces: 0,
            text: String::new(),
        };
        self.start_stream(msg, kind, deadline)
    }

    /// Sends chat messages to be rendered with the model's template in the worker; the text
    /// comes from [`Self::next_events`].
    pub fn start_render(
        &mut self,
        messages: &[securerun_models::ChatMessage],
        tools: &[serde_json::Value],
        deadline: Option<Instant>,
    ) -> Result<u64, WorkerError> {
        let msg = |id| ToWorker::Render {
            id,
            messages: messages.to_vec(),
            tools: tools.to_vec(),
        };
        self.start_stream(msg, Kind::Render, deadline)
    }

    fn start_stream(
        &mut self,
        msg: impl FnOnce(u64) -> ToWorker,
        kind: Kind,
        deadline: Option<Instant>,
    ) -> Result<u64, WorkerError> {
        let id = self.next_id;
        self.next_id += 1;
        let idle = self.streams.is_empty();
        let live = self.ensure_worker()?;
        if let Err(e) = write(&mut live.process.channel, &msg(id)) {
            return Err(self.lose_streams(e));
        }
        if idle {
            // The worker's silence is measured from the first request it has to answer.
            self.last_heard = Instant::now();
        }
        self.streams.insert(
            id,
            Stream {
                kind,
                deadline,
                cancel_sent: None,
            },
        );
        Ok(id)
    }

    /// Asks the worker to stop request `id` (its client went away); it ends, reported
    /// `Cancelled`, through [`Self::next_events`]. Nothing happens for a request not in
    /// flight or already cancelled.
    pub fn cancel(&mut self, id: u64) -> Result<(), WorkerError> {
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if stream.cancel_sent.is_some() {
            return Ok(());
        }
        stream.cancel_sent = Some(Instant::now());
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        match write(&mut live.process.channel, &ToWorker::Cancel { id }) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.lose_streams(e)),
        }
    }

    /// Waits up to `wait` for the worker, then returns what it said about the requests in
    /// flight. An error means the worker was replaced and every request in flight is lost.
    pub fn next_events(&mut self, wait: Duration) -> Result<Vec<Event>, WorkerError> {
        match self.poll_streams(wait) {
            Ok(events) => Ok(events),
            Err(e) => Err(self.lose_streams(e)),
        }
    }

    /// The worker can no longer be trusted to be in sync: it is replaced, and the requests in
    /// flight are gone with it.
    pub(super) fn lose_streams(&mut self, e: WorkerError) -> WorkerError {
        self.streams.clear();
        self.discard(e)
    }

    fn poll_streams(&mut self, wait: Duration) -> Result<Vec<Event>, WorkerError> {
        let mut events = Vec::new();
        if self.streams.is_empty() {
            std::thread::sleep(wait);
            return Ok(events);
        }
        let Some(live) = self.live.as_mut() else {
            return Err(WorkerError::Died("exited".into()));
        };
        let now = Instant::now();
        // Past its deadline a request is cancelled; past that by the grace, the worker is
        // given up on.
        let mut give_up = self.last_heard + self.settings.frame_timeout;
        let mut silent = true;
        for (&id, s) in self.streams.iter_mut() {
            if s.cancel_sent.is_none() && s.deadline.is_some_and(|d| now >= d) {
                s.cancel_sent = Some(now);
                write(&mut live.process.channel, &ToWorker::Cancel { id })?;
            }
            let kill = kill_after(s.deadline, s.cancel_sent);
            if kill < give_up {
                give_up = kill;
                silent = false;
            }
        }
        if now >= give_up {
            return Err(WorkerError::Timeout(if silent {
                self.settings.frame_timeout
            } else {
                CANCEL_GRACE
            }));
        }
        let until = give_up.min(now + wait);
        if !live
            .process
            .channel
            .wait_readable(until.saturating_duration_since(now))
        {
            return Ok(events); // the next call checks the limits again
        }
        for _ in 0..FRAMES_PER_CALL {
            // A frame that has started must arrive whole, and soon.
            let by = give_up.min(Instant::now() + FRAME_COMPLETE);
            let msg = read_by(&mut live.process.channel, by, self.settings.frame_timeout)?;
            self.last_heard = Instant::now();
            accept(&mut self.streams, msg, &mut events)?;
            if self.streams.is_empty() || !live.process.channel.readable() {
                break;
            }
        }
        if events.iter().any(|e| !matches!(e, Event::Text { .. })) {
            self.failures = 0;
        }
        Ok(events)
    }
}

/// Checks one message from the worker against the request it names and turns it into an event.
fn accept(
    streams: &mut HashMap<u64, Stream>,
    msg: FromWorker,
    events: &mut Vec<Event>,
) -> Result<(), WorkerError> {
    let id = match &msg {
        FromWorker::Text { id, .. }
        | FromWorker::Done { id, .. }
        | FromWorker::Rendered { id, .. }
        | FromWorker::Failed { id: Some(id), .. } => *id,
        other => {
            return Err(WorkerError::Protocol(format!(
                "unexpected {}",
                super::kind(other)
            )))
        }
    };
    let Some(stream) = streams.get_mut(&id) else {
        return Err(WorkerError::Protocol(format!(
            "unexpected {}",
            super::kind(&msg)
        )));
    };
    match (msg, &mut stream.kind) {
        (
            FromWorker::Text { text: piece, .. },
            Kind::Generate {
                max_tokens,
                pieces,
                text,
                ..
            },
        ) => {
            if piece.is_empty() {
                return Err(WorkerError::Protocol("an empty text piece".into()));
            }
            *pieces += 1;
            if *pieces > *max_tokens + 1 {
                return Err(WorkerError::Protocol(format!(
                    "more text pieces than max_tokens {max_tokens} allows"
                )));
            }
            if text.len() + piece.len() > max_tokens.saturating_mul(64).max(4096) {
                return Err(WorkerError::Protocol(
                    "more text than max_tokens allows".into(),
                ));
            }
            text.push_str(&piece);
            if stream.cancel_sent.is_none() {
                events.push(Event::Text { id, text: piece });
            }
        }
        (
            FromWorker::Done {
                finish_reason,
                prompt_tokens: reported,
                cached_tokens,
                token_ids,
                prefill_us,
                decode_us,
                logprobs,
                ..
            },
            Kind::Generate {
                prompt_tokens,
                max_tokens,
                pieces,
                text,
            },
        ) => {
            if token_ids.len() > *max_tokens {
                return Err(WorkerError::Protocol(format!(
                    "{} tokens for max_tokens {max_tokens}",
                    token_ids.len()
                )));
            }
            if reported != *prompt_tokens {
                return Err(WorkerError::Protocol(format!(
                    "{reported} prompt tokens reported for {prompt_tokens} sent"
                )));
            }
            // The last prompt token is always computed (its logits start the completion).
            if cached_tokens >= *prompt_tokens {
                return Err(WorkerError::Protocol(format!(
                    "{cached_tokens} cached tokens for a prompt of {prompt_tokens}"
                )));
            }
            // Each piece comes from at least one token, except a final flush of text held back
            // (stop-string lookahead).
            if *pieces > token_ids.len() + 1 {
                return Err(WorkerError::Protocol(format!(
                    "{pieces} text pieces for {} tokens",
                    token_ids.len()
                )));
            }
            // Log-probabilities, when sent, are the tokens' own, one each, bounded.
            let well_formed = logprobs.is_empty()
                || (logprobs.len() == token_ids.len()
                    && logprobs.iter().zip(&token_ids).all(|(l, &id)| {
                        l.id == id
                            && l.top.len() <= securerun_models::MAX_TOP_LOGPROBS
                            && l.logprob <= 0.0
                    }));
            if !well_formed {
                return Err(WorkerError::Protocol(
                    "log-probabilities that do not match the tokens".into(),
                ));
            }
            let finish_reason = if stream.cancel_sent.is_some() {
                FinishReason::Cancelled
            } else {
                finish_reason
            };
            let generation = Generation {
                text: std::mem::take(text),
                token_ids,
                prompt_tokens: *prompt_tokens,
                cached_tokens,
                finish_reason,
                prefill_time: Duration::from_micros(prefill_us),
                decode_time: Duration::from_micros(decode_us),
                logprobs,
            };
            streams.remove(&id);
            events.push(Event::Generated {
                id,
                result: Ok(generation),
            });
        }
        (FromWorker::Rendered { text, .. }, Kind::Render) => {
            streams.remove(&id);
            events.push(Event::Rendered {
                id,
                result: Ok(text),
            });
        }
        (FromWorker::Failed { error, cause, .. }, kind) => {
            let e = WorkerError::request(error, cause);
            let event = match kind {
                Kind::Generate { .. } => Event::Generated { id, result: Err(e) },
                Kind::Render => Event::Rendered { id, result: Err(e) },
            };
            streams.remove(&id);
            events.push(event);
        }
        (other, _) => {
            return Err(WorkerError::Protocol(format!(
                "unexpected {}",
                super::kind(&other)
            )))
        }
    }
    Ok(())
}
