//! `POST /tokenize` and `POST /detokenize` (vLLM's and llama-server's shapes), scoped like
//! inference: a prompt's or a conversation's token ids as this server counts them (a chat is
//! rendered by the engine, as for a completion), and ids back to text.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use securerun_models::{ChatMessage, Prompt};

use super::complete::encode_prompt;
use super::error::ApiError;
use super::request::ApiMessage;
use super::{model_name, only_fields, parse_json, served_model};
use crate::server::auth::Caller;
use crate::server::engine::JobControl;
use crate::server::ledger::Ledger;
use crate::server::AppState;

/// `{"model", "prompt"}` (tokenized as a completion's prompt, with the tokenizer's special
/// tokens unless `add_special_tokens` is false) or `{"model", "messages"}` (rendered with the
/// chat template, as a chat completion's prompt) → `{"count", "max_model_len", "tokens"}`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: Value = parse_json(&body)?;
    only_fields(
        &body,
        &["model", "prompt", "messages", "add_special_tokens"],
    )?;
    let served = served_model(&state, &caller, &ledger, model_name(&body)?)?;
    let add_special = match body.get("add_special_tokens") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_param(
                "add_special_tokens",
                "add_special_tokens is a boolean",
            ))
        }
    };
    let prompt = match (body.get("prompt"), body.get("messages")) {
        (Some(Value::String(p)), None) => Prompt::Text(p.clone()),
        (None, Some(Value::Array(_))) => {
            let messages: Vec<ApiMessage> = serde_json::from_value(body["messages"].clone())
                .map_err(|e| ApiError::bad_param("messages", format!("invalid messages: {e}")))?;
            let messages = messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| m.into_chat(i))
                .collect::<Result<Vec<ChatMessage>, _>>()?;
            if !served.engine.is_text {
                return Err(ApiError::bad_param(
                    "messages",
                    "this model has no chat template (it computes embeddings)",
                ));
            }
            // The same checks as a chat completion's (what a template renders outside
            // contents may not spell control tokens).
            super::check_history(&messages, &served.encoder)?;
            if body.get("add_special_tokens").is_some() {
                return Err(ApiError::bad_param(
                    "add_special_tokens",
                    "add_special_tokens applies to a prompt; a chat's special tokens are the template's",
                ));
            }
            Prompt::Chat(messages)
        }
        _ => {
            return Err(ApiError::bad_request(
                "give either prompt (a string) or messages (a list)",
            ))
        }
    };
    let tokens = match prompt {
        Prompt::Text(text) if !add_special => {
            let encoder = served.encoder.clone();
            tokio::task::spawn_blocking(move || {
                encoder
                    .tokenizer()
                    .encode(text, false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| ApiError::bad_request(format!("cannot tokenize: {e}")))
            })
            .await
            .map_err(|_| super::complete::engine_stopped())??
        }
        prompt => {
            let control =
                JobControl::new(std::time::Instant::now() + state.config.get().generation_timeout)
                    .owned_by(&caller.token_id);
            let _cancel = control.cancel_on_drop();
            encode_prompt(&served, prompt, &[], &control).await?
        }
    };
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": state.config.get().max_prompt_tokens,
        "tokens": tokens,
    }))
    .into_response())
}

/// The most ids one `/detokenize` takes.
const MAX_DETOKENIZE: usize = 1 << 16;

/// `{"model", "tokens": [ids]}` → `{"prompt": text}` (special tokens included, as they are).
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Extension(ledger): Extension<Ledger>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: Value = parse_json(&body)?;
    only_fields(&body, &["model", "tokens"])?;
    let served = served_model(&state, &caller, &ledger, model_name(&body)?)?;
    let vocab = served.encoder.vocab_size();
    let ids: Vec<u32> = match body.get("tokens").and_then(Value::as_array) {
        Some(list) if list.len() <= MAX_DETOKENIZE => list
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| (id as usize) < vocab)
                    .map(|id| id as u32)
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ApiError::bad_param(
                    "tokens",
                    format!(
                        "tokens are ids of this model (0 to {})",
                        vocab.saturating_sub(1)
                    ),
                )
            })?,
        _ => {
            return Err(ApiError::bad_param(
                "tokens",
                format!("tokens is a list of at most {MAX_DETOKENIZE} token ids"),
            ))
        }
    };
    let encoder = served.encoder.clone();
    let text = tokio::task::spawn_blocking(move || encoder.tokenizer().decode(&ids, false))
        .await
        .map_err(|_| super::complete::engine_stopped())?
        .map_err(|e| ApiError::bad_request(format!("cannot detokenize: {e}")))?;
    Ok(Json(json!({"prompt": text})).into_response())
}
