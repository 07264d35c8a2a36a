//! OpenAI-compatible request and response shapes, and the handlers that map them onto the engine.

mod admin;
mod complete;
mod embeddings;
mod error;
mod logprobs;
mod models;
mod output_check;
mod request;
mod rerank;
mod stream;
mod tokenize;
mod tools;

pub use admin::{
    admin_create_token, admin_list_tokens, admin_lockdown, admin_reload_model, admin_revoke_token,
};
pub use complete::{chat, completions, request_id};
pub use embeddings::embeddings;
pub use error::ApiError;
pub use models::{model, models};
pub use rerank::rerank;
pub use tokenize::{detokenize, tokenize};

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::Value;

use super::auth::Caller;
use super::ledger::Ledger;
use super::models::ServedModel;
use super::AppState;
use securerun_models::{ChatMessage, PromptEncoder};

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Parses a body for `route`, refusing first any field the route does not implement
/// ([`super::fields`]): nothing a client asks for is silently ignored.
pub(super) fn parse_request<T: serde::de::DeserializeOwned>(
    route: super::fields::Route,
    body: &[u8],
) -> Result<T, ApiError> {
    typed(checked(route, body)?)
}

/// A generation request: the route's own fields and the sampling fields, each read from the
/// same checked body (two plain structs rather than one flattened one, so a type error keeps
/// its field's path).
fn parse_generation<T: serde::de::DeserializeOwned>(
    route: super::fields::Route,
    body: &[u8],
) -> Result<(T, request::Sampling), ApiError> {
    let value = checked(route, body)?;
    Ok((typed(value.clone())?, typed(value)?))
}

/// The body as JSON, every top-level field checked for `route`.
fn checked(route: super::fields::Route, body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = parse_json(body)?;
    super::fields::check(route, &value).map_err(|r| match r.param.is_empty() {
        true => ApiError::bad_request(r.message),
        false => ApiError::bad_param(r.param, r.message),
    })?;
    Ok(value)
}

/// `value` as a `T`; a type error names the failing field's path in `param` (when serde can
/// tell it).
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("invalid request: {}", e.inner());
        match path.as_str() {
            "" | "." | "?" => ApiError::bad_request(message),
            _ => ApiError::bad_param(path, message),
        }
    })
}

/// The model a request names, if it is served here and the caller's token may use it. The
/// request keeps this version to its end, even if the model is replaced meanwhile.
pub(super) fn served_model(
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

/// The most bytes of an end-user identifier (`user`) accepted.
const MAX_USER_BYTES: usize = 256;

/// Records the end user a request names (OpenAI's `user`), pseudonymized with the audit's key
/// (a domain of its own: the same text as a client address gives another pseudonym).
pub(super) fn record_end_user(
    state: &AppState,
    ledger: &Ledger,
    user: Option<&Value>,
) -> Result<(), ApiError> {
    match user {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(u)) if u.len() <= MAX_USER_BYTES => {
            let pseudonym = state.audit.pseudonym(&crate::audit::keys::end_user_text(u));
            ledger.update(|r| r.end_user = Some(pseudonym));
            Ok(())
        }
        Some(_) => Err(ApiError::bad_param(
            "user",
            format!("user is a string of at most {MAX_USER_BYTES} bytes"),
        )),
    }
}

/// Refuses any field but `allowed`, naming it.
pub(super) fn only_fields(body: &Value, allowed: &[&str]) -> Result<(), ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_param(
            k.clone(),
            format!("unrecognized request argument supplied: {k}"),
        )),
        None => Ok(()),
    }
}

pub(super) fn model_name(body: &Value) -> Result<&str, ApiError> {
    body.get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_param("model", "model is required"))
}

/// Tool calls and call ids in the history reach the template outside message contents: they
/// must not spell a control token.
pub(super) fn check_history(
    messages: &[ChatMessage],
    encoder: &PromptEncoder,
) -> Result<(), ApiError> {
    for (i, m) in messages.iter().enumerate() {
        let calls = serde_json::to_string(&m.tool_calls).unwrap_or_default();
        let id = m.tool_call_id.as_deref().unwrap_or_default();
        if encoder.spells_control_token(&calls) || encoder.spells_control_token(id) {
            return Err(ApiError::bad_param(
                format!("messages[{i}].tool_calls"),
                "a tool call may not contain the text of one of the model's control tokens",
            ));
        }
    }
    Ok(())
}
