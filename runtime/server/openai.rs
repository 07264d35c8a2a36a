//! OpenAI-compatible request and response shapes, and the handlers that map them onto the engine.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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
use super::engine::Job;
use super::AppState;

/// An error in OpenAI's JSON shape.
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
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
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
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
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": null, "code": self.code,
        }});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(after) = self.retry_after {
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
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
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

fn check_model(state: &AppState, caller: &Caller, model: &str) -> Result<(), ApiError> {
    if model != state.model_id {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("model {model:?} is not served here"),
        ));
    }
    if !caller.record.allows_model(model) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "model_not_allowed",
            format!("this token may not use model {model:?}"),
        ));
    }
    Ok(())
}

fn params(state: &AppState, s: &Sampling) -> Result<GenerationParams, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
    if s.frequency_penalty.is_some_and(|p| p != 0.0) || s.presence_penalty.is_some_and(|p| p != 0.0)
    {
        return Err(ApiError::bad_request(
            "frequency_penalty and presence_penalty are not supported",
        ));
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

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens(),
        "total_tokens": g.prompt_tokens + g.completion_tokens(),
    })
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
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_json(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let texts = req.messages.iter().map(|m| m.content.clone()).collect();
    complete(
        state,
        caller,
        texts,
        Prompt::Chat(req.messages),
        req.sampling,
        Kind::Chat,
    )
    .await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_json(&body)?;
    complete(
        state,
        caller,
        vec![req.prompt.clone()],
        Prompt::Text(req.prompt),
        req.sampling,
        Kind::Text,
    )
    .await
}

async fn complete(
    state: Arc<AppState>,
    caller: Caller,
    texts: Vec<String>,
    prompt: Prompt,
    sampling: Sampling,
    kind: Kind,
) -> Result<Response, ApiError> {
    check_model(&state, &caller, &sampling.model)?;
    if !state.engine.is_text {
        return Err(ApiError::bad_request(
            "this model computes embeddings; use /v1/embeddings",
        ));
    }
    let params = params(&state, &sampling)?;
    state
        .limiters
        .generation(&caller.record, params.max_tokens as u32)
        .map_err(ApiError::limited)?;
    let (pieces_tx, pieces_rx) = mpsc::channel::<String>(64);
    let (done_tx, done_rx) = oneshot::channel();
    state
        .engine
        .submit(Job::Generate {
            prompt,
            params,
            pieces: pieces_tx,
            done: done_tx,
        })
        .map_err(|_| ApiError::busy())?;
    let id = request_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = crate::tokens::now();
    let model = state.model_id.clone();
    if sampling.stream {
        let include_usage = sampling.stream_options.is_some_and(|o| o.include_usage);
        let stream = sse_stream(
            state.clone(),
            pieces_rx,
            done_rx,
            id,
            created,
            model,
            kind,
            include_usage,
        );
        let mut resp = Sse::new(stream).into_response();
        resp.extensions_mut().insert(super::Content {
            texts,
            completion: None,
        });
        return Ok(resp);
    }
    // Non-streaming: drain pieces (the engine needs the channel read), then the result.
    let mut pieces_rx = pieces_rx;
    let drain = async move { while pieces_rx.recv().await.is_some() {} };
    let timeout = state.config.generation_timeout;
    let (_, done) = tokio::time::timeout(timeout, async { tokio::join!(drain, done_rx) })
        .await
        .map_err(|_| timed_out("generation"))?;
    let g = done
        .map_err(|_| engine_stopped())?
        .map_err(generation_error)?;
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
        prompt_tokens: g.prompt_tokens as u64,
        completion_tokens: g.completion_tokens() as u64,
    };
    let mut resp = Json(json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": [choice], "usage": usage(&g),
    }))
    .into_response();
    resp.extensions_mut().insert(usage_ext);
    resp.extensions_mut().insert(super::Content {
        texts,
        completion: Some(g.text),
    });
    Ok(resp)
}

fn engine_stopped() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "engine",
        "the engine stopped",
    )
}

fn timed_out(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "server_error",
        "timeout",
        format!("{what} timed out"),
    )
}

fn generation_error(message: String) -> ApiError {
    // Request errors from the model (prompt too long, bad template input) are the client's;
    // worker failures are ours.
    if message.contains("inference worker") {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "worker_failed",
            message,
        )
    } else {
        ApiError::bad_request(message)
    }
}

#[allow(clippy::too_many_arguments)]
fn sse_stream(
    state: Arc<AppState>,
    mut pieces: mpsc::Receiver<String>,
    done: oneshot::Receiver<Result<Generation, String>>,
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let id_for_audit = id.clone();
    let chunk = move |delta: Value, finish_reason: Value, usage: Option<Value>| {
        let choice = match kind {
            Kind::Chat => {
                json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                                 "finish_reason": finish_reason, "logprobs": null})
            }
        };
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut v = json!({"id": id, "object": object, "created": created, "model": model,
                           "choices": [choice]});
        if let Some(u) = usage {
            v["usage"] = u;
            v["choices"] = json!([]);
        }
        Event::default().data(v.to_string())
    };
    async_stream(move |tx| async move {
        if kind == Kind::Chat {
            let _ = tx
                .send(chunk(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                ))
                .await;
        }
        let keep_text = state.config.audit_content == super::config::AuditContent::Full;
        let mut completion = String::new();
        while let Some(piece) = pieces.recv().await {
            if keep_text {
                completion.push_str(&piece);
            }
            if tx
                .send(chunk(json!({"content": piece}), Value::Null, None))
                .await
                .is_err()
            {
                return; // client gone: dropping `pieces` cancels the generation
            }
        }
        match done.await {
            Ok(Ok(g)) => {
                let mut r = crate::audit::AuditRecord::event("stream_finished");
                r.model = Some(state.model_id.clone());
                r.prompt_tokens = Some(g.prompt_tokens as u64);
                r.completion_tokens = Some(g.completion_tokens() as u64);
                r.outcome = Some(finish(g.finish_reason).into());
                r.detail = Some(id_for_audit.clone());
                if keep_text {
                    r.content = Some(json!({"completion": completion}));
                }
                let _ = state.audit.append(r).await;
                state
                    .metrics
                    .generated
                    .fetch_add(g.completion_tokens() as u64, Ordering::Relaxed);
                let _ = tx
                    .send(chunk(json!({}), json!(finish(g.finish_reason)), None))
                    .await;
                if include_usage {
                    let _ = tx
                        .send(chunk(json!({}), Value::Null, Some(usage(&g))))
                        .await;
                }
            }
            Ok(Err(message)) => {
                let e = json!({"error": {"message": message, "type": "server_error", "param": null, "code": "generation_failed"}});
                let _ = tx.send(Event::default().data(e.to_string())).await;
            }
            Err(_) => {}
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    })
}

/// A stream fed by an async task through a small channel (the task stops when the client goes).
fn async_stream<F, Fut>(task: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(task(tx));
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse_json(&body)?;
    check_model(&state, &caller, &req.model)?;
    if state.engine.is_text {
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
    let (done_tx, done_rx) = oneshot::channel();
    state
        .engine
        .submit(Job::Embed {
            texts,
            done: done_tx,
        })
        .map_err(|_| ApiError::busy())?;
    let vectors = tokio::time::timeout(state.config.generation_timeout, done_rx)
        .await
        .map_err(|_| timed_out("embedding"))?
        .map_err(|_| engine_stopped())?
        .map_err(generation_error)?;
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
        "object": "list", "data": data, "model": state.model_id,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }))
    .into_response();
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
    let data: Vec<Value> = if caller.record.allows_model(&state.model_id) {
        vec![
            json!({"id": state.model_id, "object": "model", "created": state.started, "owned_by": "securerun"}),
        ]
    } else {
        Vec::new()
    };
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /admin/tokens`: every token record (never a secret).
pub async fn admin_list_tokens(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let records = state.tokens.store().load().map_err(admin_error)?;
    Ok(Json(json!({"object": "list", "data": records})).into_response())
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
    let expires = req.expires_in.map(|s| crate::tokens::now() + s);
    let created = state
        .tokens
        .store()
        .create(
            &req.name,
            req.scopes.into_iter().collect(),
            req.models,
            limits,
            expires,
        )
        .map_err(admin_error)?;
    state.tokens.refresh();
    tracing::info!(by = %caller.token_id, token = %created.record.id, "token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": created.token, "record": created.record})),
    )
        .into_response())
}

/// `DELETE /admin/tokens/{id_or_name}`: revokes a token at once.
pub async fn admin_revoke_token(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let record = state.tokens.store().revoke(&id).map_err(admin_error)?;
    state.tokens.refresh();
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
    crate::lockdown::set(&state.state_dir, req.on, &req.reason).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "lockdown",
            e.to_string(),
        )
    })?;
    state.lockdown.store(req.on, Ordering::Relaxed);
    let mut r = crate::audit::AuditRecord::event(if req.on {
        "lockdown_on"
    } else {
        "lockdown_off"
    });
    r.token_id = Some(caller.token_id.clone());
    let _ = state.audit.append(r).await;
    Ok(Json(json!({"lockdown": req.on})).into_response())
}

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
