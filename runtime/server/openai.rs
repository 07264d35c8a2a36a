//! OpenAI-compatible request and response shapes, and the handlers that map them onto the engine.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Extension, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use securerun_models::{
    ChatMessage, FinishReason, Generation, GenerationParams, Prompt, SamplingParams,
};

use super::auth::{Caller, Limited};
use super::engine::{EngineError, Job, JobControl};
use super::interrupt::{self, Interruption};
use super::ledger::{Fate, Ledger};
use super::models::ServedModel;
use super::AppState;

/// An error in OpenAI's JSON shape.
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// The outcome for the audit record, when the status alone does not say it.
    pub outcome: Option<&'static str>,
    /// Token counts so far (a request interrupted while it ran); boxed, errors stay small.
    pub usage: Option<Box<super::Usage>>,
    /// The request field at fault (OpenAI's `param`); boxed, errors stay small.
    pub param: Option<Box<str>>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
            outcome: None,
            usage: None,
            param: None,
        }
    }

    /// The error as one server-sent event (a stream's final word).
    pub fn event(&self) -> Event {
        Event::default().data(self.body().to_string())
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param.as_deref(), "code": self.code,
        }})
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    /// A 400 naming the request field at fault.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.param = Some(param.into().into_boxed_str());
        e
    }

    pub fn limited(l: Limited) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            format!("{} exceeded; retry later", l.what),
        );
        e.retry_after = Some(l.retry_after);
        e
    }

    pub fn busy() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "overloaded",
            "the server is at capacity; retry later",
        );
        e.retry_after = Some(Duration::from_secs(1));
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(o) = self.outcome {
            resp.extensions_mut().insert(super::RecordedOutcome(o));
        }
        if let Some(u) = self.usage {
            resp.extensions_mut().insert(*u);
        }
        // Every 429 and 503 says when to come back (a client's backoff needs it), 1 s unless
        // the error knows better.
        let retry_after = self.retry_after.or_else(|| {
            matches!(
                self.status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            )
            .then_some(Duration::from_secs(1))
        });
        if let Some(after) = retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}

/// `stop` may be a string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by chat and text completions. Unknown OpenAI fields are accepted and ignored
/// only where harmless (n must be 1, logprobs unsupported).
#[derive(Deserialize)]
struct Sampling {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ApiMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// A chat message as clients send it: content as a string or as parts, and fields this server
/// does not implement (refused unless neutral: see [`ApiMessage::into_chat`]).
#[derive(Deserialize)]
struct ApiMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl ApiMessage {
    /// The message the template renders, or a 400 naming the field (`messages[i].…`) this
    /// server does not implement. Text parts are joined with newlines (as vLLM joins them);
    /// `developer` is the system role under its newer name.
    fn into_chat(self, i: usize) -> Result<ChatMessage, ApiError> {
        let at = |field: &str| format!("messages[{i}].{field}");
        let role = match self.role.as_str() {
            "system" | "user" | "assistant" => self.role,
            "developer" => "system".to_string(),
            other => {
                return Err(ApiError::bad_param(
                    at("role"),
                    format!("role {other:?} is not supported (system, developer, user, assistant)"),
                ))
            }
        };
        for (field, value) in &self.rest {
            let neutral = match (field.as_str(), value) {
                (_, Value::Null) => true,
                ("tool_calls", Value::Array(a)) => a.is_empty(),
                _ => false,
            };
            if !neutral {
                return Err(ApiError::bad_param(
                    at(field),
                    format!("{field} in a message is not supported by this server"),
                ));
            }
        }
        let content = match self.content {
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let kind = part.get("type").and_then(Value::as_str);
                    match (kind, part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(text)) => texts.push(text),
                        _ => {
                            return Err(ApiError::bad_param(
                                at(&format!("content[{j}].type")),
                                format!(
                                    "content part type {:?} is not supported; only text parts are",
                                    kind.unwrap_or("(none)")
                                ),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
            None => {
                return Err(ApiError::bad_param(
                    at("content"),
                    "every message needs content",
                ))
            }
        };
        Ok(ChatMessage { role, content })
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: String,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: EmbeddingInput,
    #[serde(default)]
    encoding_format: Option<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Parses a body for `route`, refusing first any field the route does not implement
/// ([`super::fields`]): nothing a client asks for is silently ignored.
fn parse_request<T: serde::de::DeserializeOwned>(
    route: super::fields::Route,
    body: &[u8],
) -> Result<T, ApiError> {
    let value: Value = parse_json(body)?;
    super::fields::check(route, &value).map_err(|r| match r.param.is_empty() {
        true => ApiError::bad_request(r.message),
        false => ApiError::bad_param(r.param, r.message),
    })?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// The model a request names, if it is served here and the caller's token may use it. The
/// request keeps this version to its end, even if the model is replaced meanwhile.
fn served_model(
    state: &AppState,
    caller: &Caller,
    ledger: &Ledger,
    model: &str,
) -> Result<Arc<ServedModel>, ApiError> {
    // Only a served model's name reaches the record (never an arbitrary client string).
    let Some(served) = state.models.get(model) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("model {model:?} is not served here"),
        ));
    };
    ledger.update(|r| r.model = Some(served.name().to_string()));
    if !caller.record.allows_model(model) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "model_not_allowed",
            format!("this token may not use model {model:?}"),
        ));
    }
    Ok(served)
}

fn params(state: &AppState, s: &Sampling) -> Result<GenerationParams, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    for (param, value) in [
        ("frequency_penalty", s.frequency_penalty),
        ("presence_penalty", s.presence_penalty),
    ] {
        if value.is_some_and(|p| p != 0.0) {
            return Err(ApiError::bad_param(
                param,
                format!("{param} is not supported"),
            ));
        }
    }
    let max_tokens = s
        .max_completion_tokens
        .or(s.max_tokens)
        .unwrap_or(state.config.default_max_tokens);
    if max_tokens == 0 || max_tokens > state.config.max_tokens_cap {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between 1 and {}",
            state.config.max_tokens_cap
        )));
    }
    let stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(|x| x.is_empty() || x.len() > 256) {
        return Err(ApiError::bad_request(
            "stop: at most 4 non-empty strings of up to 256 bytes",
        ));
    }
    Ok(GenerationParams {
        max_tokens: max_tokens as usize,
        sampling: SamplingParams {
            // OpenAI's default temperature is 1.
            temperature: s.temperature.unwrap_or(1.0),
            top_p: s.top_p.filter(|&p| p < 1.0),
            top_k: None,
            repetition_penalty: 1.0,
            seed: s.seed.unwrap_or_else(rand_seed),
        },
        stop,
        ignore_eos: false,
        max_prompt_tokens: Some(state.config.max_prompt_tokens),
    })
}

fn rand_seed() -> u64 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u64()
}

fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

pub fn request_id(prefix: &str) -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_request(super::fields::Route::Chat, &body)?;
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
    let texts = messages.iter().map(|m| m.content.clone()).collect();
    let call = Call {
        state,
        caller,
        ledger,
    };
    complete(
        call,
        texts,
        Prompt::Chat(messages),
        req.sampling,
        Kind::Chat,
    )
    .await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_request(super::fields::Route::Completions, &body)?;
    let call = Call {
        state,
        caller,
        ledger,
    };
    complete(
        call,
        vec![req.prompt.clone()],
        Prompt::Text(req.prompt),
        req.sampling,
        Kind::Text,
    )
    .await
}

/// One authenticated request: the server, who asked, and its audit record.
struct Call {
    state: Arc<AppState>,
    caller: Caller,
    ledger: Ledger,
}

/// Tokenizes a prompt here, in the server, on a blocking thread. A chat prompt is first
/// rendered by the engine (the template is code from the model file: in a confined worker it
/// runs under the sandbox and its memory cap); its tokens are counted here either way.
async fn encode_prompt(
    served: &ServedModel,
    prompt: Prompt,
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

async fn complete(
    call: Call,
    texts: Vec<String>,
    prompt: Prompt,
    sampling: Sampling,
    kind: Kind,
) -> Result<Response, ApiError> {
    let Call {
        state,
        caller,
        ledger,
    } = call;
    let served = served_model(&state, &caller, &ledger, &sampling.model)?;
    if !served.engine.is_text {
        return Err(ApiError::bad_request(
            "this model computes embeddings; use /v1/embeddings",
        ));
    }
    let deadline = Instant::now() + state.config.generation_timeout;
    let params = params(&state, &sampling)?;
    // Counted here, from our own tokenizer: the prompt's length, the budget and the usage
    // never depend on what the worker says.
    let control = JobControl::new(deadline).owned_by(&caller.token_id);
    let prompt_ids = encode_prompt(&served, prompt, &control).await?;
    let prompt_tokens = prompt_ids.len() as u64;
    // Known now: recorded even if the client goes away before the answer.
    ledger.update(|r| r.prompt_tokens = Some(prompt_tokens));
    if prompt_ids.len() > state.config.max_prompt_tokens {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} tokens; at most {} are accepted",
            prompt_ids.len(),
            state.config.max_prompt_tokens
        )));
    }
    state
        .limiters
        .tokens(&caller.record, prompt_tokens + params.max_tokens as u64)
        .map_err(|l| {
            state.metrics.limited.fetch_add(1, Ordering::Relaxed);
            ApiError::limited(l)
        })?;
    let (pieces_tx, pieces_rx) = mpsc::channel::<String>(64);
    let (done_tx, done_rx) = oneshot::channel();
    let job = Job::Generate {
        prompt_ids,
        params,
        control: control.clone(),
        pieces: pieces_tx,
        done: done_tx,
    };
    let id = request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = crate::tokens::now();
    if sampling.stream {
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
        };
        // Keep-alive comments while nothing else is sent (a long prefill): a client that has
        // gone is noticed within about two of them, and its generation cancelled.
        let keep_alive = axum::response::sse::KeepAlive::new().interval(STREAM_KEEP_ALIVE);
        let mut resp = Sse::new(stream.spawn())
            .keep_alive(keep_alive)
            .into_response();
        resp.extensions_mut().insert(super::Streaming);
        return Ok(resp);
    }
    served.engine.submit(job).map_err(|_| ApiError::busy())?;
    // Dropped with this future (the client went away): the job stops.
    let _cancel = control.cancel_on_drop();
    // Non-streaming: drain pieces (the engine needs the channel read), then the result.
    let mut pieces_rx = pieces_rx;
    let drain = async move { while pieces_rx.recv().await.is_some() {} };
    let mut done_rx = done_rx;
    let finished = tokio::select! {
        (_, done) = async { tokio::join!(drain, &mut done_rx) } => Ok(done),
        why = interrupt::interrupted(&state, &caller, deadline) => Err(why),
    };
    let g = match finished {
        Ok(done) => done
            .map_err(|_| engine_stopped())?
            .map_err(ApiError::from)?,
        Err(why) => {
            control.cancel();
            // The worker's last word on how far it got, briefly.
            let so_far = tokio::time::timeout(CANCEL_WAIT, done_rx).await;
            let completion = match so_far {
                Ok(Ok(Ok(g))) => g.completion_tokens() as u64,
                _ => 0,
            };
            return Err(interrupted_error(&state, why, prompt_tokens, completion));
        }
    };
    if g.finish_reason == FinishReason::Cancelled {
        // The engine ended it before this handler saw why (its deadline passed): an
        // interruption, never a short completion.
        let why = interrupt::why_engine_stopped(&state, &caller);
        let completion = g.completion_tokens() as u64;
        return Err(interrupted_error(&state, why, prompt_tokens, completion));
    }
    state
        .metrics
        .generated
        .fetch_add(g.completion_tokens() as u64, Ordering::Relaxed);
    let choice = match kind {
        Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": finish(g.finish_reason), "logprobs": null}),
        Kind::Text => json!({"index": 0, "text": g.text, "finish_reason": finish(g.finish_reason),
                             "logprobs": null}),
    };
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let usage_ext = super::Usage {
        prompt_tokens,
        cached_tokens: g.cached_tokens as u64,
        completion_tokens: g.completion_tokens() as u64,
    };
    let mut resp = Json(json!({
        "id": id, "object": object, "created": created, "model": served.name(),
        "choices": [choice], "usage": usage_json(usage_ext),
    }))
    .into_response();
    resp.extensions_mut().insert(usage_ext);
    resp.extensions_mut().insert(super::Content {
        texts,
        completion: Some(g.text),
    });
    Ok(resp)
}

/// How long an interrupted request waits for the engine to say how far it got.
const CANCEL_WAIT: Duration = Duration::from_secs(3);

fn engine_stopped() -> ApiError {
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
fn interrupted_error(
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
    e.usage = Some(Box::new(super::Usage {
        prompt_tokens,
        completion_tokens,
        ..Default::default()
    }));
    e
}

fn usage_json(u: super::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// How often a stream with nothing to say sends an SSE comment (so a vanished client is seen).
const STREAM_KEEP_ALIVE: Duration = Duration::from_millis(500);

/// A streamed completion: owns the request's audit record until the stream ends.
struct StreamTask {
    state: Arc<AppState>,
    /// The model version the stream runs on (kept until it ends, even across a replacement).
    served: Arc<ServedModel>,
    caller: Caller,
    ledger: Ledger,
    control: JobControl,
    pieces: mpsc::Receiver<String>,
    done: oneshot::Receiver<Result<Generation, EngineError>>,
    id: String,
    created: u64,
    kind: Kind,
    include_usage: bool,
    prompt_tokens: u64,
    texts: Vec<String>,
}

/// How a stream ended, before its record is written.
enum StreamEnd {
    Finished,
    /// The client went away (`false`) or stopped reading for `send_timeout` (`true`).
    Client {
        stalled: bool,
    },
    Interrupted(Interruption),
}

impl StreamTask {
    /// Starts the task; returns the body stream hyper sends.
    fn spawn(self) -> impl Stream<Item = Result<Event, Infallible>> {
        let (tx, rx) = mpsc::channel(16);
        let (drained_tx, drained_rx) = oneshot::channel();
        tokio::spawn(self.run(tx, drained_rx));
        Drained {
            rx,
            drained: Some(drained_tx),
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Value, usage: Option<Value>) -> Event {
        let choice = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                       "finish_reason": finish_reason, "logprobs": null})
            }
        };
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
        let wait = self.state.config.send_timeout;
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
        let keep_text = self.state.config.audit_content == super::config::AuditContent::Full;
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
        if matches!(end, StreamEnd::Finished) {
            end = loop {
                tokio::select! {
                    piece = self.pieces.recv() => match piece {
                        Some(piece) => {
                            pieces += 1;
                            if keep_text {
                                completion.push_str(&piece);
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
                let last = match &generation {
                    Some(Ok(g)) => {
                        let mut events =
                            vec![self.chunk(json!({}), json!(finish(g.finish_reason)), None)];
                        if self.include_usage {
                            let u = super::Usage {
                                prompt_tokens: self.prompt_tokens,
                                cached_tokens: g.cached_tokens as u64,
                                completion_tokens,
                            };
                            events.push(self.chunk(json!({}), Value::Null, Some(usage_json(u))));
                        }
                        Ok(events)
                    }
                    Some(Err(e)) => Err(ApiError::from(e.clone())),
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
        let content = super::Content {
            texts: std::mem::take(&mut self.texts),
            completion: keep_text.then_some(completion),
        };
        self.ledger
            .update(|r| super::record_content(&state, r, content));
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
struct Drained {
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

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse_request(super::fields::Route::Embeddings, &body)?;
    let served = served_model(&state, &caller, &ledger, &req.model)?;
    if served.engine.is_text {
        return Err(ApiError::bad_request(
            "this model generates text; it has no /v1/embeddings",
        ));
    }
    let as_base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format {other:?}: use \"float\" or \"base64\""
            )))
        }
    };
    let texts = match req.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
    };
    let audited = texts.clone();
    if texts.is_empty() || texts.len() > state.config.max_embedding_inputs {
        return Err(ApiError::bad_request(format!(
            "input must hold 1 to {} strings",
            state.config.max_embedding_inputs
        )));
    }
    let encoder = served.encoder.clone();
    let counted = texts.clone();
    let input_tokens: u64 = tokio::task::spawn_blocking(move || encoder.count(&counted))
        .await
        .map_err(|_| engine_stopped())?
        .map_err(|e| ApiError::bad_request(e.to_string()))?
        .iter()
        .map(|&n| n as u64)
        .sum();
    state
        .limiters
        .tokens(&caller.record, input_tokens)
        .map_err(|l| {
            state.metrics.limited.fetch_add(1, Ordering::Relaxed);
            ApiError::limited(l)
        })?;
    let deadline = Instant::now() + state.config.generation_timeout;
    let control = JobControl::new(deadline).owned_by(&caller.token_id);
    let (done_tx, done_rx) = oneshot::channel();
    served
        .engine
        .submit(Job::Embed {
            texts,
            tokens: usize::try_from(input_tokens).unwrap_or(usize::MAX),
            control: control.clone(),
            done: done_tx,
        })
        .map_err(|_| ApiError::busy())?;
    let _cancel = control.cancel_on_drop();
    let vectors = tokio::select! {
        done = done_rx => done.map_err(|_| engine_stopped())?.map_err(ApiError::from)?,
        why = interrupt::interrupted(&state, &caller, deadline) => {
            control.cancel();
            let mut e = why.error();
            e.outcome = Some(why.outcome());
            return Err(e);
        }
    };
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // base64: the little-endian f32 bytes, as the official client expects by default.
            let embedding = if as_base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(crate::signing::bundle::b64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let mut resp = Json(json!({
        "object": "list", "data": data, "model": served.name(),
        "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens},
    }))
    .into_response();
    resp.extensions_mut().insert(super::Usage {
        prompt_tokens: input_tokens,
        ..Default::default()
    });
    resp.extensions_mut().insert(super::Content {
        texts: audited,
        completion: None,
    });
    Ok(resp)
}

pub async fn models(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    // Only the models this token may use: the others' names are not its business.
    let data: Vec<Value> = state
        .models
        .all()
        .iter()
        .filter(|m| caller.record.allows_model(m.name()))
        .map(|m| model_object(m))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

fn model_object(m: &ServedModel) -> Value {
    json!({"id": m.name(), "object": "model", "created": m.loaded_at, "owned_by": "securerun"})
}

/// `GET /v1/models/{id}`: one model, if this token may use it. A model served here that the
/// token may not use is the same 404 as one that does not exist: its name is not this
/// token's business either.
pub async fn model(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    match state.models.get(&id) {
        Some(m) if caller.record.allows_model(m.name()) => {
            Ok(Json(model_object(&m)).into_response())
        }
        _ => {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("the model {id:?} does not exist or this token may not use it"),
            );
            e.param = Some("model".into());
            Err(e)
        }
    }
}

/// `GET /admin/tokens`: every token record (never a secret).
pub async fn admin_list_tokens(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let records = state.tokens.store().load().map_err(admin_error)?;
    let views: Vec<_> = records.iter().map(|r| r.view()).collect();
    Ok(Json(json!({"object": "list", "data": views})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    scopes: Vec<crate::tokens::Scope>,
    #[serde(default)]
    models: Vec<String>,
    /// Lifetime in seconds.
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    requests_per_min: Option<u32>,
    #[serde(default)]
    tokens_per_min: Option<u32>,
    /// The holder consents to content recording (see `token create --consent-content`).
    #[serde(default)]
    consent_content: bool,
}

/// `POST /admin/tokens`: creates a token; the secret is in this response only.
pub async fn admin_create_token(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateToken = parse_json(&body)?;
    let defaults = crate::tokens::Limits::default();
    let limits = crate::tokens::Limits {
        requests_per_min: req
            .requests_per_min
            .unwrap_or(defaults.requests_per_min)
            .max(1),
        tokens_per_min: req.tokens_per_min.unwrap_or(defaults.tokens_per_min).max(1),
    };
    let expires = match req.expires_in {
        None => None,
        Some(s) => Some(
            crate::tokens::now()
                .checked_add(s)
                .filter(|_| s <= MAX_EXPIRES_IN)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "expires_in must be at most {MAX_EXPIRES_IN} seconds (10 years)"
                    ))
                })?,
        ),
    };
    let mut created = crate::tokens::TokenStore::prepare(
        &req.name,
        req.scopes.into_iter().collect(),
        req.models,
        limits,
        expires,
    )
    .map_err(admin_error)?;
    let store = state.tokens.store();
    if store
        .load()
        .map_err(admin_error)?
        .iter()
        .any(|t| t.name == created.record.name)
    {
        return Err(admin_error(crate::tokens::TokenError::DuplicateName(
            created.record.name.clone(),
        )));
    }
    if req.consent_content {
        created.record.consent_content = Some(crate::tokens::Consent::now(format!(
            "admin token {}",
            caller.token_id
        )));
    }
    record_first(&state, &caller, created.record.audit_event("token_created")).await?;
    if let Some(c) = &created.record.consent_content {
        record_first(&state, &caller, c.audit_event(&created.record)).await?;
    }
    store.insert(&created.record).map_err(admin_error)?;
    let _ = state.tokens.refresh();
    tracing::info!(by = %caller.token_id, token = %created.record.id, "token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": created.token, "record": created.record.view()})),
    )
        .into_response())
}

/// `DELETE /admin/tokens/{id_or_name}`: revokes a token at once.
pub async fn admin_revoke_token(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let store = state.tokens.store();
    let found = store.find(&id).map_err(admin_error)?;
    record_first(&state, &caller, found.audit_event("token_revoked")).await?;
    let record = store.revoke(&found.id).map_err(admin_error)?;
    let _ = state.tokens.refresh();
    tracing::info!(by = %caller.token_id, token = %record.id, "token revoked");
    Ok(Json(json!({"revoked": record.id})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lockdown {
    on: bool,
    #[serde(default)]
    reason: String,
}

/// `POST /admin/lockdown {"on": true|false}`: refuse (or serve again) all non-admin requests.
pub async fn admin_lockdown(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: Lockdown = parse_json(&body)?;
    let mut r = crate::audit::AuditRecord::event(if req.on {
        "lockdown_on"
    } else {
        "lockdown_off"
    });
    // The reason is recorded even when long: cut, never dropped.
    if !req.reason.is_empty() {
        r.detail = Some(super::ledger::bounded_text(&req.reason, 512));
    }
    record_first(&state, &caller, r).await?;
    crate::lockdown::set(&state.state_dir, req.on, &req.reason).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "lockdown",
            e.to_string(),
        )
    })?;
    state.lockdown.store(req.on, Ordering::Relaxed);
    Ok(Json(json!({"lockdown": req.on})).into_response())
}

/// `POST /admin/models/{name}/reload`: replaces model `name` by the version on disk now,
/// verified and started beside the running one; running requests finish on the old version.
pub async fn admin_reload_model(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    use super::models::ReplaceError;
    let by = format!("token {}", caller.token_id);
    match super::models::replace(&state, &name, &by).await {
        Ok(new) => Ok(Json(json!({
            "model": new.name(), "version": new.version, "loaded_at": new.loaded_at,
            "signer": new.signer,
        }))
        .into_response()),
        Err(e @ ReplaceError::Unknown(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            e.to_string(),
        )),
        Err(e @ ReplaceError::Refused { .. }) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "model_refused",
            e.to_string(),
        )),
        Err(e @ ReplaceError::Audit(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "audit_unavailable",
            e.to_string(),
        )),
    }
}

/// Writes an admin action's record (by the calling token) and waits until it is durable; the
/// action is taken only after this succeeds, and refused (503) otherwise.
async fn record_first(
    state: &AppState,
    caller: &Caller,
    mut record: crate::audit::AuditRecord,
) -> Result<(), ApiError> {
    record.outcome = Some("ok".into());
    let by = format!("by token {}", caller.token_id);
    record.detail = Some(match record.detail.take() {
        Some(d) => format!("{d}; {by}"),
        None => by,
    });
    state.audit.append(record).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "audit_unavailable",
            format!("not done: the action could not be audited ({e})"),
        )
    })
}

/// The longest token lifetime the admin API accepts (ten years).
const MAX_EXPIRES_IN: u64 = 10 * 366 * 24 * 3600;

fn admin_error(e: crate::tokens::TokenError) -> ApiError {
    use crate::tokens::TokenError;
    match e {
        TokenError::NotFound(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            e.to_string(),
        ),
        TokenError::DuplicateName(_) | TokenError::Invalid(_) => {
            ApiError::bad_request(e.to_string())
        }
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "token_store",
            other.to_string(),
        ),
    }
}
