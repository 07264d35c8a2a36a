//! A streamed completion (server-sent events): it owns the request's audit record until the
//! stream ends, however it ends.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use securerun_models::{FinishReason, Generation};

use super::complete::{engine_stopped, usage_json, Kind, CANCEL_WAIT};
use super::error::ApiError;
use super::request::finish;
use crate::server::auth::Caller;
use crate::server::engine::{EngineError, JobControl};
use crate::server::interrupt::{self, Interruption};
use crate::server::ledger::{Fate, Ledger};
use crate::server::models::ServedModel;
use crate::server::AppState;

/// How often a stream with nothing to say sends an SSE comment (so a vanished client is seen).
pub(super) const STREAM_KEEP_ALIVE: Duration = Duration::from_millis(500);

/// A streamed completion: owns the request's audit record until the stream ends.
pub(super) struct StreamTask {
    pub(super) state: Arc<AppState>,
    /// The model version the stream runs on (kept until it ends, even across a replacement).
    pub(super) served: Arc<ServedModel>,
    pub(super) caller: Caller,
    pub(super) ledger: Ledger,
    pub(super) control: JobControl,
    pub(super) pieces: mpsc::Receiver<String>,
    pub(super) done: oneshot::Receiver<Result<Generation, EngineError>>,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) kind: Kind,
    pub(super) include_usage: bool,
    pub(super) prompt_tokens: u64,
    pub(super) texts: Vec<String>,
    pub(super) tools: StreamTools,
    /// Whether the request asked for log-probabilities: they come in one chunk before the
    /// last (the worker reports them with the generation's end).
    pub(super) logprobs: bool,
    /// What a complete answer must be (a JSON response format): checked before its end is
    /// reported as `stop`.
    pub(super) check: Option<super::output_check::OutputCheck>,
}

/// Whether a stream may carry tool calls. A call is held back until the answer ends and sent
/// as `tool_calls` deltas (never as text): with `forced` the whole answer is calls; otherwise
/// an answer whose first character is `<` is (text cannot start so under the grammar).
pub(super) struct StreamTools {
    pub(super) active: bool,
    pub(super) forced: bool,
    /// The only calls an answer may hold, and what their arguments must be.
    pub(super) checks: std::sync::Arc<super::tools::ToolChecks>,
}

/// How a stream ended, before its record is written.
pub(super) enum StreamEnd {
    Finished,
    /// The client went away (`false`) or stopped reading for `send_timeout` (`true`).
    Client {
        stalled: bool,
    },
    Interrupted(Interruption),
}

impl StreamTask {
    /// Starts the task; returns the body stream hyper sends.
    pub(super) fn spawn(self) -> impl Stream<Item = Result<Event, Infallible>> {
        let (tx, rx) = mpsc::channel(16);
        let (drained_tx, drained_rx) = oneshot::channel();
        tokio::spawn(self.run(tx, drained_rx));
        Drained {
            rx,
            drained: Some(drained_tx),
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Value, usage: Option<Value>) -> Event {
        self.chunk_with(delta, finish_reason, usage, Value::Null)
    }

    fn chunk_with(
        &self,
        delta: Value,
        finish_reason: Value,
        usage: Option<Value>,
        logprobs: Value,
    ) -> Event {
        let mut choice = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                       "finish_reason": finish_reason, "logprobs": null})
            }
        };
        choice["logprobs"] = logprobs;
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created,
                           "model": self.served.name(), "choices": [choice]});
        if let Some(u) = usage {
            v["usage"] = u;
            v["choices"] = json!([]);
        }
        Event::default().data(v.to_string())
    }

    async fn run(mut self, tx: mpsc::Sender<Event>, drained: oneshot::Receiver<()>) {
        let wait = self.state.config.get().send_timeout;
        let send = |tx: &mpsc::Sender<Event>, ev: Event| {
            let tx = tx.clone();
            async move {
                match tx.send_timeout(ev, wait).await {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(true),
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(false),
                }
            }
        };
        let keep_text =
            self.state.config.get().audit_content == crate::server::config::AuditContent::Full;
        let mut completion = String::new();
        let mut pieces = 0u64;
        let state = self.state.clone();
        let caller = self.caller.clone();
        let interruption = interrupt::interrupted(&state, &caller, self.control.deadline);
        tokio::pin!(interruption);
        let mut end = StreamEnd::Finished;
        if self.kind == Kind::Chat {
            let role = self.chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                None,
            );
            if let Err(stalled) = send(&tx, role).await {
                end = StreamEnd::Client { stalled };
            }
        }
        // Text held back as a possible tool call (see `StreamTools`).
        let mut held = String::new();
        // The whole answer, when it must pass the output check.
        let mut answer = String::new();
        let mut holding = self.tools.forced;
        let mut decided = !self.tools.active || self.tools.forced;
        if matches!(end, StreamEnd::Finished) {
            end = loop {
                tokio::select! {
                    piece = self.pieces.recv() => match piece {
                        Some(piece) => {
                            pieces += 1;
                            if keep_text {
                                completion.push_str(&piece);
                            }
                            if self.check.is_some() {
                                answer.push_str(&piece);
                            }
                            if !decided && !piece.is_empty() {
                                decided = true;
                                holding = piece.starts_with('<');
                            }
                            if holding || !decided {
                                held.push_str(&piece);
                                continue;
                            }
                            let ev = self.chunk(json!({"content": piece}), Value::Null, None);
                            if let Err(stalled) = send(&tx, ev).await {
                                break StreamEnd::Client { stalled };
                            }
                        }
                        None => break StreamEnd::Finished,
                    },
                    why = &mut interruption => break StreamEnd::Interrupted(why),
                    // The connection is gone (hyper dropped the body): noticed even while the
                    // prompt is still being fed and nothing was sent (keep-alives find out).
                    _ = tx.closed() => break StreamEnd::Client { stalled: false },
                }
            };
        }
        // Whatever ended it, the generation stops now (a no-op if it already has).
        self.control.cancel();
        self.pieces.close();
        let generation = match tokio::time::timeout(CANCEL_WAIT, &mut self.done).await {
            Ok(Ok(r)) => Some(r),
            _ => None,
        };
        let completion_tokens = match &generation {
            Some(Ok(g)) => g.completion_tokens() as u64,
            _ => pieces,
        };
        if let (StreamEnd::Finished, Some(Ok(g))) = (&end, &generation) {
            if g.finish_reason == FinishReason::Cancelled {
                // The engine ended it before this task saw why (its deadline passed).
                end = StreamEnd::Interrupted(interrupt::why_engine_stopped(&state, &caller));
            }
        }
        state
            .metrics
            .generated
            .fetch_add(completion_tokens, Ordering::Relaxed);
        let mut status = 200;
        let outcome: &str = match end {
            StreamEnd::Client { stalled } => {
                if stalled {
                    state
                        .metrics
                        .responses_stalled
                        .fetch_add(1, Ordering::Relaxed);
                    "send_timeout"
                } else {
                    "client_closed"
                }
            }
            StreamEnd::Interrupted(why) => {
                let _ = send(&tx, why.error().event()).await;
                let _ = send(&tx, Event::default().data("[DONE]")).await;
                why.outcome()
            }
            StreamEnd::Finished => {
                let read = match self.tools.active {
                    true => super::tools::read_answer(&held, &self.tools.checks),
                    false => super::tools::Answer::Text,
                };
                let invalid = |g: &Generation| {
                    matches!(read, super::tools::Answer::Invalid)
                        || (g.finish_reason == FinishReason::Stop
                            && self.check.as_ref().is_some_and(|c| !c.accepts(&answer)))
                };
                let last = match &generation {
                    Some(Ok(g)) if invalid(g) => Err(super::output_check::OutputCheck::failed()),
                    Some(Ok(g)) => {
                        let mut events = Vec::new();
                        let mut reason = finish(g.finish_reason);
                        match read {
                            super::tools::Answer::Calls(calls) => {
                                for (i, call) in calls.into_iter().enumerate() {
                                    let mut head = call.clone();
                                    head["function"]["arguments"] = json!("");
                                    head["index"] = json!(i);
                                    let args = json!({"index": i, "function": {
                                        "arguments": call["function"]["arguments"]}});
                                    for delta in [head, args] {
                                        events.push(self.chunk(
                                            json!({"tool_calls": [delta]}),
                                            Value::Null,
                                            None,
                                        ));
                                    }
                                }
                                reason = "tool_calls";
                            }
                            // Not calls after all (cut off by the budget): the text it is.
                            _ if !held.is_empty() => events.push(self.chunk(
                                json!({"content": std::mem::take(&mut held)}),
                                Value::Null,
                                None,
                            )),
                            _ => {}
                        }
                        if self.logprobs {
                            let lp = match self.kind {
                                Kind::Chat => {
                                    super::logprobs::chat(&self.served.encoder, &g.logprobs)
                                }
                                Kind::Text => super::logprobs::completion(
                                    &self.served.encoder,
                                    &g.logprobs,
                                    0,
                                ),
                            };
                            events.push(self.chunk_with(json!({}), Value::Null, None, lp));
                        }
                        events.push(self.chunk(json!({}), json!(reason), None));
                        if self.include_usage {
                            let u = crate::server::Usage {
                                prompt_tokens: self.prompt_tokens,
                                cached_tokens: g.cached_tokens as u64,
                                completion_tokens,
                            };
                            events.push(self.chunk(json!({}), Value::Null, Some(usage_json(u))));
                        }
                        Ok(events)
                    }
                    Some(Err(e)) => Err(super::complete::with_grammar_field(
                        ApiError::from(e.clone()),
                        self.tools.active,
                    )),
                    None => Err(engine_stopped()),
                };
                let outcome = match last {
                    Ok(events) => {
                        let mut r = Ok(());
                        for ev in events {
                            r = r.and(send(&tx, ev).await);
                        }
                        r = r.and(send(&tx, Event::default().data("[DONE]")).await);
                        drop(tx);
                        // Delivered only once hyper has taken the last event for the client.
                        match (r, tokio::time::timeout(wait, drained).await) {
                            (Ok(()), Ok(Ok(()))) => "ok",
                            (Err(true), _) | (Ok(()), Err(_)) => {
                                state
                                    .metrics
                                    .responses_stalled
                                    .fetch_add(1, Ordering::Relaxed);
                                "send_timeout"
                            }
                            _ => "client_closed",
                        }
                    }
                    Err(e) => {
                        status = e.status.as_u16();
                        let _ = send(&tx, e.event()).await;
                        let _ = send(&tx, Event::default().data("[DONE]")).await;
                        if status == 400 {
                            "refused_bad_request"
                        } else {
                            "error"
                        }
                    }
                };
                outcome
            }
        };
        let content = crate::server::Content {
            texts: std::mem::take(&mut self.texts),
            completions: keep_text.then_some(completion).into_iter().collect(),
        };
        self.ledger
            .update(|r| crate::server::record_content(&state, r, content));
        let fate = Fate {
            status: Some(status),
            outcome,
            prompt_tokens: Some(self.prompt_tokens),
            completion_tokens: Some(completion_tokens),
        };
        if let Err(e) = self.ledger.finish(fate).await {
            tracing::error!(error = %e, "could not record the end of a stream");
        }
    }
}

/// The SSE body: events from the stream task; tells the task when hyper has taken the last.
pub(super) struct Drained {
    rx: mpsc::Receiver<Event>,
    drained: Option<oneshot::Sender<()>>,
}

impl Stream for Drained {
    type Item = Result<Event, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(None) => {
                if let Some(d) = self.drained.take() {
                    let _ = d.send(());
                }
                std::task::Poll::Ready(None)
            }
            std::task::Poll::Ready(Some(ev)) => std::task::Poll::Ready(Some(Ok(ev))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}
