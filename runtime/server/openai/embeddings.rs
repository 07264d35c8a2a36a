//! `POST /v1/embeddings`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::complete::engine_stopped;
use super::error::ApiError;
use super::request::{embedding_inputs, EmbeddingRequest};
use super::{parse_request, record_end_user, served_model};
use crate::server::auth::Caller;
use crate::server::engine::{Job, JobControl};
use crate::server::interrupt::{self};
use crate::server::ledger::Ledger;
use crate::server::models::ServedModel;
use crate::server::AppState;
use securerun_models::EmbedInput;

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse_request(crate::server::fields::Route::Embeddings, &body)?;
    record_end_user(&state, &ledger, req.user.as_ref())?;
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
            return Err(ApiError::bad_param(
                "encoding_format",
                format!("encoding_format {other:?}: use \"float\" or \"base64\""),
            ))
        }
    };
    let inputs = embedding_inputs(req.input)?;
    // Only texts are content (token ids are the client's own encoding of it).
    let audited = inputs
        .iter()
        .filter_map(|i| match i {
            EmbedInput::Text(t) => Some(t.clone()),
            EmbedInput::Ids(_) => None,
        })
        .collect();
    if inputs.is_empty() || inputs.len() > state.config.get().max_embedding_inputs {
        return Err(ApiError::bad_param(
            "input",
            format!(
                "input must hold 1 to {} inputs",
                state.config.get().max_embedding_inputs
            ),
        ));
    }
    let vocab = served.encoder.vocab_size();
    if let Some((i, _)) = inputs.iter().enumerate().find(|(_, input)| match input {
        EmbedInput::Ids(ids) => ids.is_empty() || ids.iter().any(|&id| id as usize >= vocab),
        EmbedInput::Text(_) => false,
    }) {
        return Err(ApiError::bad_param(
            "input",
            format!(
                "input {i}: token ids are a non-empty list of ids of this model (0 to {})",
                vocab.saturating_sub(1)
            ),
        ));
    }
    let (vectors, input_tokens) = embed_inputs(&state, &caller, &served, inputs).await?;
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
    Ok(input_response(
        json!({"object": "list", "data": data, "model": served.name()}),
        input_tokens,
        audited,
    ))
}

/// The response of a route that only reads inputs (embeddings, rerank): `body` with its
/// `usage`, and the counts and texts its audit record takes.
pub(super) fn input_response(mut body: Value, input_tokens: u64, texts: Vec<String>) -> Response {
    body["usage"] = json!({"prompt_tokens": input_tokens, "total_tokens": input_tokens});
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(crate::server::Usage {
        prompt_tokens: input_tokens,
        ..Default::default()
    });
    resp.extensions_mut().insert(crate::server::Content {
        texts,
        completions: Vec::new(),
    });
    resp
}

/// Embeds `inputs` (counted here, charged to the caller's token budget, run by the engine
/// within the generation timeout): the vectors and the input tokens.
pub(super) async fn embed_inputs(
    state: &Arc<AppState>,
    caller: &Caller,
    served: &ServedModel,
    inputs: Vec<EmbedInput>,
) -> Result<(Vec<Vec<f32>>, u64), ApiError> {
    let encoder = served.encoder.clone();
    let texts: Vec<String> = inputs
        .iter()
        .filter_map(|i| match i {
            EmbedInput::Text(t) => Some(t.clone()),
            EmbedInput::Ids(_) => None,
        })
        .collect();
    let id_tokens: u64 = inputs
        .iter()
        .map(|i| match i {
            EmbedInput::Ids(ids) => ids.len() as u64,
            EmbedInput::Text(_) => 0,
        })
        .sum();
    let text_tokens: u64 = tokio::task::spawn_blocking(move || encoder.count(&texts))
        .await
        .map_err(|_| engine_stopped())?
        .map_err(|e| ApiError::bad_request(e.to_string()))?
        .iter()
        .map(|&n| n as u64)
        .sum();
    let input_tokens = text_tokens + id_tokens;
    state
        .limiters
        .tokens(&caller.record, input_tokens)
        .map_err(|l| {
            state.metrics.limited.fetch_add(1, Ordering::Relaxed);
            ApiError::limited(l)
        })?;
    let deadline = Instant::now() + state.config.get().generation_timeout;
    let control = JobControl::new(deadline).owned_by(&caller.token_id);
    let (done_tx, done_rx) = oneshot::channel();
    served
        .engine
        .submit(Job::Embed {
            inputs,
            tokens: usize::try_from(input_tokens).unwrap_or(usize::MAX),
            control: control.clone(),
            done: done_tx,
        })
        .map_err(|_| ApiError::busy())?;
    let _cancel = control.cancel_on_drop();
    let vectors = tokio::select! {
        done = done_rx => done.map_err(|_| engine_stopped())?.map_err(ApiError::from)?,
        why = interrupt::interrupted(state, caller, deadline) => {
            control.cancel();
            let mut e = why.error();
            e.outcome = Some(why.outcome());
            return Err(e);
        }
    };
    Ok((vectors, input_tokens))
}
