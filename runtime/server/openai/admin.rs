//! The admin API: tokens, lockdown, model reload. Each action is recorded before it is taken.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::parse_json;
use crate::server::auth::Caller;
use crate::server::AppState;

/// `GET /admin/tokens`: every token record (never a secret).
pub async fn admin_list_tokens(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let records = state.tokens.store().load().map_err(admin_error)?;
    let views: Vec<_> = records.iter().map(|r| r.view()).collect();
    Ok(Json(json!({"object": "list", "data": views})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateToken {
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
pub(super) struct Lockdown {
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
        r.detail = Some(crate::server::ledger::bounded_text(&req.reason, 512));
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
    use crate::server::models::ReplaceError;
    let by = format!("token {}", caller.token_id);
    match crate::server::models::replace(&state, &name, &by).await {
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
        Err(e @ ReplaceError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            e.to_string(),
        )),
    }
}

/// Writes an admin action's record (by the calling token) and waits until it is durable; the
/// action is taken only after this succeeds, and refused (503) otherwise.
pub(super) async fn record_first(
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
pub(super) const MAX_EXPIRES_IN: u64 = 10 * 366 * 24 * 3600;

pub(super) fn admin_error(e: crate::tokens::TokenError) -> ApiError {
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
