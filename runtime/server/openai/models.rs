//! `GET /v1/models` and `GET /v1/models/{id}`.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::server::auth::Caller;
use crate::server::models::ServedModel;
use crate::server::AppState;

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

pub(super) fn model_object(m: &ServedModel) -> Value {
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
