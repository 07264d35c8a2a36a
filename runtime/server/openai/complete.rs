//! `POST /v1/chat/completions` and `POST /v1/completions`: one generation, whole or streamed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use securerun_models::{FinishReason, Prompt};

use super::error::ApiError;
use super::logprobs;
use super::output_check::OutputCheck;
use super::request::{
    completion_prompts, finish, params, ChatRequest, CompletionPrompt, CompletionRequest, Sampling,
};
use super::stream::StreamTools;
use super::stream::{StreamTask, STREAM_KEEP_ALIVE};
use super::tools::{self, ToolPlan};
use super::{check_history, parse_generation, record_end_user, served_model};
use crate::server::auth::Caller;
use crate::server::engine::{EngineError, Job, JobControl};
use crate::server::interrupt::{self};
use crate::server::ledger::Ledger;
use crate::server::models::ServedModel;
use crate::server::AppState;

pub fn request_id(prefix: &str) -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Chat,
    Text,
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (req, sampling): (ChatRequest, _) =
        parse_generation(crate::server::fields::Route::Chat, &body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    let messages = req
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.into_chat(i))
        .collect::<Result<Vec<_>, _>>()?;
    // Tools depend on the model's tokenizer (control-token text): checked once it is known.
    let tool_request = ToolRequest {
        tools: req.tools,
        choice: req.tool_choice,
        parallel: req.parallel_tool_calls,
    };
    let texts = messages.iter().map(|m| m.content.clone()).collect();
    let call = Call {
        state,
        caller,
        ledger,
    };
    complete(
        call,
        texts,
        vec![Input::Prompt(Prompt::Chat(messages))],
        sampling,
        Kind::Chat,
        Some(tool_request),
    )
    .await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (req, sampling): (CompletionRequest, _) =
        parse_generation(crate::server::fields::Route::Completions, &body)?;
    let prompts = completion_prompts(req.prompt)?;
    if prompts.len() > 1 && sampling.stream {
        return Err(ApiError::bad_param(
            "stream",
            "several prompts are answered in one response, not streamed: stream each as its own request",
        ));
    }
    let mut texts = Vec::new();
    let inputs = prompts
        .into_iter()
        .map(|p| match p {
            CompletionPrompt::Text(t) => {
                texts.push(t.clone());
                Input::Prompt(Prompt::Text(t))
            }
            CompletionPrompt::Ids(ids) => Input::Ids(ids),
        })
        .collect();
    let call = Call {
        state,
        caller,
        ledger,
    };
    complete(call, texts, inputs, sampling, Kind::Text, None).await
}

/// What a completion starts from: a prompt to encode here, or a client's token ids.
pub(super) enum Input {
    Prompt(Prompt),
    Ids(Vec<u32>),
}

/// The tool fields of a chat request, checked once the model (its tokenizer) is known.
pub(super) struct ToolRequest {
    pub(super) tools: Option<Vec<Value>>,
    pub(super) choice: Option<Value>,
    pub(super) parallel: Option<bool>,
}

/// One authenticated request: the server, who asked, and its audit record.
pub(super) struct Call {
    pub(super) state: Arc<AppState>,
    pub(super) caller: Caller,
    pub(super) ledger: Ledger,
}

/// Tokenizes a prompt here, in the server, on a blocking thread. A chat prompt is first
/// rendered by the engine (the template is code from the model file: in a confined worker it
/// runs under the sandbox and its memory cap); its tokens are counted here either way.
pub(super) async fn encode_prompt(
    served: &ServedModel,
    prompt: Prompt,
    tools: &[Value],
    control: &JobControl,
) -> Result<Vec<u32>, ApiError> {
    let encoder = served.encoder.clone();
    let encoded = match prompt {
        Prompt::Chat(messages) => {
            // Message contents that spell a control token are rendered as markers and
            // tokenized as text here (`ChatPlan`): only the template places control tokens.
            let (messages, plan) = encoder.chat_plan(messages);
            let (done, rendered) = oneshot::channel();
            served
                .engine
                .submit(Job::Render {
                    messages,
                    tools: tools.to_vec(),
                    control: control.clone(),
                    done,
                })
                .map_err(|_| ApiError::busy())?;
            let text = rendered
                .await
                .map_err(|_| engine_stopped())?
                .map_err(ApiError::from)?;
            tokio::task::spawn_blocking(move || encoder.chat_ids(&plan, &text)).await
        }
        text => tokio::task::spawn_blocking(move || encoder.prompt_ids(&text)).await,
    };
    encoded
        .map_err(|_| engine_stopped())?
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Generates the answer to each of `inputs` (one for chat; one or several prompts for
/// completions, each its own sequence and its own choice; several are never streamed).
pub(super) async fn complete(
    call: Call,
    texts: Vec<String>,
    inputs: Vec<Input>,
    sampling: Sampling,
    kind: Kind,
    tool_request: Option<ToolRequest>,
) -> Result<Response, ApiError> {
    let Call {
        state,
        caller,
        ledger,
    } = call;
    record_end_user(&state, &ledger, sampling.user.as_ref())?;
    let served = served_model(&state, &caller, &ledger, &sampling.model)?;
    if !served.engine.is_text {
        return Err(ApiError::bad_request(
            "this model computes embeddings; use /v1/embeddings",
        ));
    }
    let deadline = Instant::now() + state.config.get().generation_timeout;
    // Chat asks with a boolean, completions with a count.
    match (kind, &sampling.logprobs) {
        (Kind::Chat, Some(Value::Number(_))) | (Kind::Text, Some(Value::Bool(true))) => {
            return Err(ApiError::bad_param(
                "logprobs",
                "logprobs is true or false on chat, a count (0 to 5) on completions",
            ))
        }
        _ => {}
    }
    let mut params = params(&state, &sampling, served.encoder.vocab_size())?;
    let check = OutputCheck::for_format(sampling.response_format.as_ref())?;
    let tools = match tool_request {
        None => ToolPlan::default(),
        Some(r) => {
            let encoder = served.encoder.clone();
            let plan = tokio::task::spawn_blocking(move || {
                tools::plan(r.tools, r.choice, r.parallel, &encoder)
            })
            .await
            .map_err(|_| engine_stopped())??;
            if let [Input::Prompt(Prompt::Chat(messages))] = &inputs[..] {
                check_history(messages, &served.encoder)?;
            }
            plan
        }
    };
    if (tools.active() || params.grammar.is_some()) && !params.stop.is_empty() {
        // A stop string could cut a JSON answer or a call short of what its grammar completes.
        return Err(ApiError::bad_param(
            "stop",
            "stop cannot be combined with response_format or tool calls",
        ));
    }
    if tools.active() {
        if params.grammar.is_some() {
            return Err(ApiError::bad_param(
                "response_format",
                "response_format cannot be combined with tool calls here (set tool_choice to none)",
            ));
        }
        params.grammar = tools.grammar.clone();
    }
    // Counted here, from our own tokenizer: the prompt's length, the budget and the usage
    // never depend on what the worker says.
    let control = JobControl::new(deadline).owned_by(&caller.token_id);
    let several = inputs.len() > 1;
    let mut prompts = Vec::with_capacity(inputs.len());
    for input in inputs {
        prompts.push(match input {
            Input::Prompt(prompt) => {
                encode_prompt(&served, prompt, &tools.for_template, &control).await?
            }
            Input::Ids(ids) => {
                let vocab = served.encoder.vocab_size();
                if ids.iter().any(|&id| id as usize >= vocab) {
                    return Err(ApiError::bad_param(
                        "prompt",
                        format!(
                            "token ids of this model are 0 to {}",
                            vocab.saturating_sub(1)
                        ),
                    ));
                }
                ids
            }
        });
    }
    let prompt_tokens: u64 = prompts.iter().map(|p| p.len() as u64).sum();
    // Known now: recorded even if the client goes away before the answer.
    ledger.update(|r| r.prompt_tokens = Some(prompt_tokens));
    if let Some((i, long)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() > state.config.get().max_prompt_tokens)
    {
        let which = if several {
            format!("prompt {i}")
        } else {
            "the prompt".to_string()
        };
        return Err(ApiError::bad_request(format!(
            "{which} has {} tokens; at most {} are accepted",
            long.len(),
            state.config.get().max_prompt_tokens
        )));
    }
    let answers = prompts.len() as u64;
    state
        .limiters
        .tokens(
            &caller.record,
            prompt_tokens + answers * params.max_tokens as u64,
        )
        .map_err(|l| {
            state.metrics.limited.fetch_add(1, Ordering::Relaxed);
            ApiError::limited(l)
        })?;
    let params_logprobs = params.logprobs.is_some();
    let id = request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = crate::tokens::now();
    if sampling.stream {
        let (Some(prompt_ids), false) = (prompts.pop(), several) else {
            return Err(ApiError::bad_param(
                "stream",
                "several prompts are answered in one response, not streamed",
            ));
        };
        let (pieces_tx, pieces_rx) = mpsc::channel::<String>(64);
        let (done_tx, done_rx) = oneshot::channel();
        let job = Job::Generate {
            prompt_ids,
            params,
            control: control.clone(),
            pieces: pieces_tx,
            done: done_tx,
        };
        // Record before acting: the stream's start is durable before generation begins; its
        // one `request` record follows when it ends.
        if let Some(mut marker) = ledger.snapshot() {
            marker.event = "stream_started".into();
            marker.prompt_tokens = Some(prompt_tokens);
            if state.audit.append(marker).await.is_err() {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "audit_unavailable",
                    "the server cannot record this request in its audit log; retry later",
                ));
            }
        }
        served.engine.submit(job).map_err(|_| ApiError::busy())?;
        let stream = StreamTask {
            state: state.clone(),
            served: served.clone(),
            caller,
            ledger,
            control,
            pieces: pieces_rx,
            done: done_rx,
            id,
            created,
            kind,
            include_usage: sampling.stream_options.is_some_and(|o| o.include_usage),
            prompt_tokens,
            texts,
            logprobs: params_logprobs,
            check,
            tools: StreamTools {
                active: tools.active(),
                forced: tools.forced,
                checks: tools.checks.clone(),
            },
        };
        // Keep-alive comments while nothing else is sent (a long prefill): a client that has
        // gone is noticed within about two of them, and its generation cancelled.
        let keep_alive = axum::response::sse::KeepAlive::new().interval(STREAM_KEEP_ALIVE);
        let mut resp = Sse::new(stream.spawn())
            .keep_alive(keep_alive)
            .into_response();
        resp.extensions_mut().insert(crate::server::Streaming);
        return Ok(resp);
    }
    // Dropped with this future (the client went away): every job of the request stops.
    let _cancel = control.cancel_on_drop();
    let mut receivers = Vec::with_capacity(prompts.len());
    for prompt_ids in prompts {
        let (pieces_tx, mut pieces_rx) = mpsc::channel::<String>(64);
        let (done_tx, done_rx) = oneshot::channel();
        let job = Job::Generate {
            prompt_ids,
            params: params.clone(),
            control: control.clone(),
            pieces: pieces_tx,
            done: done_tx,
        };
        // A full queue part-way: the jobs already queued stop with the request (`_cancel`).
        served.engine.submit(job).map_err(|_| ApiError::busy())?;
        // Pieces are drained on their own task (the engine needs the channel read; it ends
        // when the generation does).
        tokio::spawn(async move { while pieces_rx.recv().await.is_some() {} });
        receivers.push(done_rx);
    }
    // Results are taken as they come, whichever prompt ends first, and kept: a failure of
    // any prompt ends the request at once (the others stop with it), and an interruption
    // never loses a result already taken from its channel (polling it again would panic).
    let mut results: Vec<Option<_>> = receivers.iter().map(|_| None).collect();
    let mut pending: FuturesUnordered<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| async move { (i, rx.await) })
        .collect();
    let interrupted = interrupt::interrupted(&state, &caller, deadline);
    tokio::pin!(interrupted);
    let why = loop {
        tokio::select! {
            next = pending.next() => match next {
                None => break None,
                Some((i, r)) => {
                    let failed = !matches!(r, Ok(Ok(_)));
                    results[i] = Some(r);
                    if failed {
                        break None;
                    }
                }
            },
            why = &mut interrupted => break Some(why),
        }
    };
    if let Some(why) = why {
        control.cancel();
        // The worker's last word on how far each got, briefly.
        let _ = tokio::time::timeout(CANCEL_WAIT, async {
            while let Some((i, r)) = pending.next().await {
                results[i] = Some(r);
            }
        })
        .await;
        let completion = results
            .iter()
            .flatten()
            .filter_map(|r| r.as_ref().ok()?.as_ref().ok())
            .map(|g| g.completion_tokens() as u64)
            .sum();
        return Err(interrupted_error(&state, why, prompt_tokens, completion));
    }
    drop(pending);
    let mut answers = Vec::with_capacity(results.len());
    // A failed prompt's error (the others were stopped by `_cancel` on return).
    for done in results.iter_mut().filter_map(Option::take) {
        answers.push(
            done.map_err(|_| engine_stopped())?
                .map_err(|e| with_grammar_field(ApiError::from(e), tools.active()))?,
        );
    }
    let completion_tokens: u64 = answers.iter().map(|g| g.completion_tokens() as u64).sum();
    if answers
        .iter()
        .any(|g| g.finish_reason == FinishReason::Cancelled)
    {
        // The engine ended it before this handler saw why (its deadline passed): an
        // interruption, never a short completion.
        let why = interrupt::why_engine_stopped(&state, &caller);
        return Err(interrupted_error(
            &state,
            why,
            prompt_tokens,
            completion_tokens,
        ));
    }
    state
        .metrics
        .generated
        .fetch_add(completion_tokens, Ordering::Relaxed);
    let mut choices = Vec::with_capacity(answers.len());
    for (index, g) in answers.iter().enumerate() {
        if g.finish_reason == FinishReason::Stop
            && check.as_ref().is_some_and(|c| !c.accepts(&g.text))
        {
            return Err(OutputCheck::failed());
        }
        let calls = match tools.active() {
            false => None,
            true => match tools::read_answer(&g.text, &tools.checks) {
                tools::Answer::Calls(calls) => Some(calls),
                tools::Answer::Text => None,
                tools::Answer::Invalid => return Err(OutputCheck::failed()),
            },
        };
        let logprobs = match (params_logprobs, kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => logprobs::chat(&served.encoder, &g.logprobs),
            (true, Kind::Text) => logprobs::completion(&served.encoder, &g.logprobs, 0),
        };
        choices.push(match (kind, calls) {
            (Kind::Chat, Some(calls)) => json!({"index": index,
                "message": {"role": "assistant", "content": null, "tool_calls": calls},
                "finish_reason": "tool_calls", "logprobs": logprobs}),
            (Kind::Chat, None) => json!({"index": index,
                "message": {"role": "assistant", "content": g.text},
                "finish_reason": finish(g.finish_reason), "logprobs": logprobs}),
            (Kind::Text, _) => json!({"index": index, "text": g.text,
                "finish_reason": finish(g.finish_reason), "logprobs": logprobs}),
        });
    }
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let usage_ext = crate::server::Usage {
        prompt_tokens,
        cached_tokens: answers.iter().map(|g| g.cached_tokens as u64).sum(),
        completion_tokens,
    };
    let mut resp = Json(json!({
        "id": id, "object": object, "created": created, "model": served.name(),
        "choices": choices, "usage": usage_json(usage_ext),
    }))
    .into_response();
    resp.extensions_mut().insert(usage_ext);
    resp.extensions_mut().insert(crate::server::Content {
        texts,
        completions: answers.into_iter().map(|g| g.text).collect(),
    });
    Ok(resp)
}

/// How long an interrupted request waits for the engine to say how far it got.
pub(super) const CANCEL_WAIT: Duration = Duration::from_secs(3);

pub(super) fn engine_stopped() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "engine",
        "the engine stopped",
    )
}

impl From<EngineError> for ApiError {
    /// Request errors from the model (prompt too long, bad template input) are the client's;
    /// worker failures are ours.
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Request(m) => ApiError::bad_request(m),
            // The handler names the field the grammar came from when it was not this one.
            EngineError::Grammar(m) => ApiError::bad_param("response_format", m),
            // Its text is the engine's internal state: logged by nobody, shown to nobody.
            EngineError::GrammarStep(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "grammar_failed",
                "the output grammar could not continue the answer (a limitation of the grammar \
                 engine for this schema)",
            ),
            EngineError::Worker(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "worker_failed",
                m,
            ),
            EngineError::Dropped => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "timeout",
                "the request timed out before it ran",
            ),
        }
    }
}

/// The error for a request interrupted while it ran, with what it had generated (counted).
pub(super) fn interrupted_error(
    state: &AppState,
    why: interrupt::Interruption,
    prompt_tokens: u64,
    completion_tokens: u64,
) -> ApiError {
    state
        .metrics
        .generated
        .fetch_add(completion_tokens, Ordering::Relaxed);
    let mut e = why.error();
    e.outcome = Some(why.outcome());
    e.usage = Some(Box::new(crate::server::Usage {
        prompt_tokens,
        completion_tokens,
        ..Default::default()
    }));
    e
}

pub(super) fn usage_json(u: crate::server::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// An engine error for a request whose grammar came from `tools` rather than
/// `response_format`: the 400 names the field the client wrote.
pub(super) fn with_grammar_field(mut e: ApiError, tools: bool) -> ApiError {
    if tools && e.param.as_deref() == Some("response_format") {
        e.param = Some("tools".into());
    }
    e
}
