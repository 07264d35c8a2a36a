//! `securerun serve`: an OpenAI-compatible REST server over rustls, deny-by-default behind the
//! built-in access tokens, with per-token rate limits and global bounds. The model runs in the
//! confined worker; this process keeps the network, TLS keys and tokens.

pub mod auth;
pub mod config;
pub mod engine;
pub mod openai;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use config::ServeConfig;
use openai::ApiError;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub forbidden: AtomicU64,
    pub limited: AtomicU64,
    pub lockouts: AtomicU64,
    pub generated: AtomicU64,
    pub worker_restarts: AtomicU64,
    pub sandbox_violations: AtomicU64,
    pub audit_failures: AtomicU64,
}

/// Shared by every handler.
pub struct AppState {
    pub config: ServeConfig,
    pub state_dir: std::path::PathBuf,
    pub lockdown: std::sync::atomic::AtomicBool,
    pub audit: crate::audit::AuditLog,
    pub model_id: String,
    pub started: u64,
    pub engine: engine::Engine,
    pub tokens: auth::TokenCache,
    pub limiters: auth::Limiters,
    pub metrics: Arc<Metrics>,
}

/// Every route the server registers, with its method; the deny-by-default test walks this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/admin/tokens"),
    ("POST", "/admin/tokens"),
    ("DELETE", "/admin/tokens/example"),
    ("POST", "/admin/lockdown"),
];

/// The application: routes behind the authentication middleware and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route(
            "/admin/tokens",
            get(openai::admin_list_tokens).post(openai::admin_create_token),
        )
        .route(
            "/admin/tokens/{id}",
            axum::routing::delete(openai::admin_revoke_token),
        )
        .route("/admin/lockdown", post(openai::admin_lockdown))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            audit_requests,
        ))
        .with_state(state)
}

/// Deny by default: every request except [`auth::PUBLIC`] paths needs a valid token with the
/// route's scope.
async fn authorize(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    if auth::PUBLIC.contains(&path.as_str()) {
        return next.run(req).await;
    }
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    if let Some(wait) = state.limiters.locked_out(ip) {
        state.metrics.lockouts.fetch_add(1, Ordering::Relaxed);
        let mut r = crate::audit::AuditRecord::event("client_locked_out");
        r.client = Some(state.audit.pseudonym(&ip.to_string()));
        r.route = Some(path.clone());
        let _ = state.audit.append(r).await;
        state.metrics.limited.fetch_add(1, Ordering::Relaxed);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "locked_out",
            "too many failed authentications from this client; retry later",
        );
        e.retry_after = Some(wait);
        return e.into_response();
    }
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let caller = match auth::authenticate(&state.tokens, header) {
        Ok(c) => c,
        Err(rejection) => {
            state.limiters.failed_auth(ip);
            state.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            let client = state.audit.pseudonym(&ip.to_string());
            tracing::info!(client = %client, path = %path, reason = ?rejection, "unauthenticated request refused");
            let message = match rejection {
                crate::tokens::Rejection::Missing => "missing bearer token",
                crate::tokens::Rejection::Malformed => "malformed bearer token",
                crate::tokens::Rejection::Unknown => "invalid or revoked token",
                crate::tokens::Rejection::Expired => "expired token",
            };
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                message,
            )
            .into_response();
            resp.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
    };
    let Some(scope) = auth::scope_for(&path) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "no such route",
        )
        .into_response();
    };
    if scope != crate::tokens::Scope::Admin && state.lockdown.load(Ordering::Relaxed) {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "lockdown",
            "the server is in lockdown; only administrative requests are served",
        );
        e.retry_after = Some(Duration::from_secs(60));
        let mut resp = e.into_response();
        resp.extensions_mut().insert(caller);
        return resp;
    }
    if !caller.record.scopes.contains(&scope) {
        state.metrics.forbidden.fetch_add(1, Ordering::Relaxed);
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "insufficient_scope",
            format!("this token lacks the {} scope", scope.as_str()),
        )
        .into_response();
    }
    if let Err(l) = state.limiters.request(&caller.record) {
        state.metrics.limited.fetch_add(1, Ordering::Relaxed);
        return ApiError::limited(l).into_response();
    }
    tracing::info!(token = %caller.token_id, path = %path, "request");
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(caller);
    resp
}

/// The texts of a request (and its completion), for `--audit-content hmac|full`.
#[derive(Debug, Clone, Default)]
pub struct Content {
    pub texts: Vec<String>,
    pub completion: Option<String>,
}

/// Token counts a handler reports for the audit record.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        401 => "refused_unauthenticated",
        403 => "refused_forbidden",
        404 => "not_found",
        413 => "refused_too_large",
        429 => "refused_rate_limited",
        400..=499 => "refused_bad_request",
        503 => "refused_unavailable",
        _ => "error",
    }
}

/// Outermost layer: every request, refused or served, gets a durable audit record before its
/// response leaves. If the record cannot be written, the client gets 503 instead.
async fn audit_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let request_id = openai::request_id("req");
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| state.audit.pseudonym(&c.0.ip().to_string()));
    let route = format!("{} {}", req.method(), req.uri().path());
    let mut record = crate::audit::AuditRecord::event("request");
    record.request_id = Some(request_id.clone());
    record.client = client;
    record.route = Some(route);
    record.model = Some(state.model_id.clone());
    // A broken log refuses work before any is done (and recovers once a write succeeds).
    if !state.audit.healthy() {
        let mut probe = record.clone();
        probe.outcome = Some("refused_unavailable".into());
        if state.audit.append(probe).await.is_err() {
            return audit_unavailable(&state);
        }
    }
    let mut resp = next.run(req).await;
    let status = resp.status();
    record.status = Some(status.as_u16());
    record.outcome = Some(outcome(status).into());
    record.latency_ms = Some(started.elapsed().as_millis() as u64);
    if let Some(caller) = resp.extensions().get::<auth::Caller>() {
        record.token_id = Some(caller.token_id.clone());
    }
    if let Some(u) = resp.extensions().get::<Usage>() {
        record.prompt_tokens = Some(u.prompt_tokens);
        record.completion_tokens = Some(u.completion_tokens);
    }
    if let Some(c) = resp.extensions_mut().remove::<Content>() {
        match state.config.audit_content {
            config::AuditContent::None => {}
            config::AuditContent::Hmac => {
                record.content_hmac =
                    Some(c.texts.iter().map(|t| state.audit.pseudonym(t)).collect());
            }
            config::AuditContent::Full => {
                record.content =
                    Some(serde_json::json!({"texts": c.texts, "completion": c.completion}));
            }
        }
    }
    if resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
    {
        record.outcome = Some("stream_started".into());
    }
    if state.audit.append(record).await.is_err() {
        return audit_unavailable(&state);
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn audit_unavailable(state: &AppState) -> Response {
    state.metrics.audit_failures.fetch_add(1, Ordering::Relaxed);
    tracing::error!(error = ?state.audit.last_error(), "audit log unavailable: refusing request");
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "audit_unavailable",
        "the server cannot record this request in its audit log; retry later",
    );
    e.retry_after = Some(Duration::from_secs(5));
    e.into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let counters: [(&str, &str, u64); 11] = [
        ("requests_total", "HTTP requests received", get(&m.requests)),
        (
            "unauthorized_total",
            "requests refused for a missing or invalid token",
            get(&m.unauthorized),
        ),
        ("forbidden_total", "requests refused for scope", get(&m.forbidden)),
        (
            "rate_limited_total",
            "requests refused by a rate limit or lockout",
            get(&m.limited),
        ),
        (
            "lockout_refusals_total",
            "requests refused because their client is locked out after failed authentications",
            get(&m.lockouts),
        ),
        ("generated_tokens_total", "tokens generated", get(&m.generated)),
        (
            "worker_restarts_total",
            "inference workers that died or broke the protocol and were replaced",
            get(&m.worker_restarts),
        ),
        (
            "sandbox_violations_total",
            "inference workers killed by the seccomp filter",
            get(&m.sandbox_violations),
        ),
        (
            "audit_unavailable_total",
            "requests refused because the audit log could not be written",
            get(&m.audit_failures),
        ),
        (
            "audit_records_total",
            "audit records written",
            get(&state.audit.writes),
        ),
        (
            "audit_write_microseconds_total",
            "time spent waiting for durable audit writes (divide by audit_records_total for the mean)",
            get(&state.audit.write_us),
        ),
    ];
    let mut body: String = counters
        .iter()
        .map(|(name, help, v)| {
            format!("# HELP securerun_{name} {help}\n# TYPE securerun_{name} counter\nsecurerun_{name} {v}\n")
        })
        .collect();
    body.push_str(&format!(
        "# HELP securerun_lockdown 1 while the server refuses every non-admin request\n# TYPE securerun_lockdown gauge\nsecurerun_lockdown {}\n",
        u8::from(state.lockdown.load(Ordering::Relaxed))
    ));
    body.push_str(&format!(
        "# HELP securerun_audit_healthy 1 while the audit log accepts writes\n# TYPE securerun_audit_healthy gauge\nsecurerun_audit_healthy {}\n",
        u8::from(state.audit.healthy())
    ));
    (
        [("content-type", "text/plain; version=0.0.4")],
        Body::from(body),
    )
        .into_response()
}

/// Keeps the token cache fresh, and audits tokens that appear, disappear or expire.
pub fn spawn_token_reloader(state: Arc<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(auth::RELOAD);
        let mut known: std::collections::HashMap<String, bool> = state
            .tokens
            .records()
            .iter()
            .map(|r| (r.id.clone(), r.expired(crate::tokens::now())))
            .collect();
        loop {
            tick.tick().await;
            state.tokens.refresh();
            // Operator actions CLI commands left while this server holds the log.
            let audit = state.audit.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || audit.ingest_spool()).await {
                tracing::error!(error = %e, "could not record spooled operator actions");
            }
            let lockdown = crate::lockdown::is_on(&state.state_dir);
            if state.lockdown.swap(lockdown, Ordering::Relaxed) != lockdown {
                let event = if lockdown {
                    "lockdown_on"
                } else {
                    "lockdown_off"
                };
                tracing::warn!(event, "lockdown changed");
                let mut r = crate::audit::AuditRecord::event(event);
                r.detail = crate::lockdown::describe(&state.state_dir);
                let _ = state.audit.append(r).await;
            }
            let now = crate::tokens::now();
            let current: std::collections::HashMap<String, bool> = state
                .tokens
                .records()
                .iter()
                .map(|r| (r.id.clone(), r.expired(now)))
                .collect();
            let mut events = Vec::new();
            for (id, expired) in &current {
                match known.get(id) {
                    None => events.push(("token_created", id)),
                    Some(false) if *expired => events.push(("token_expired", id)),
                    _ => {}
                }
            }
            for id in known.keys() {
                if !current.contains_key(id) {
                    events.push(("token_revoked", id));
                }
            }
            for (event, id) in events {
                let mut r = crate::audit::AuditRecord::event(event);
                r.token_id = Some(id.clone());
                let _ = state.audit.append(r).await;
            }
            known = current;
        }
    });
}

/// Resolves on SIGTERM or SIGINT. The handlers are registered when this is called (not when
/// the future is first polled), so a signal sent right after "listening" is not lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
        tracing::info!("shutdown requested: no new connections, draining");
    }
}

/// How long in-flight requests get to finish after a shutdown signal.
pub const DRAIN: Duration = Duration::from_secs(30);
