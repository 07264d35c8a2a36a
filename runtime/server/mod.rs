//! `securerun serve`: an OpenAI-compatible REST server over rustls, deny-by-default behind the
//! built-in access tokens, with per-token rate limits and global bounds. The model runs in the
//! confined worker; this process keeps the network, TLS keys and tokens.

pub mod auth;
pub mod body;
pub mod client;
pub mod config;
pub mod connections;
pub mod engine;
pub mod fields;
pub mod http_metrics;
pub mod interrupt;
pub mod ledger;
pub mod lifecycle;
pub mod models;
pub mod openai;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use ledger::{Fate, Ledger};
use openai::ApiError;

/// Counters and gauges for `/metrics`.
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
    pub token_store_errors: AtomicU64,
    pub jobs_dropped: AtomicU64,
    /// Embedding calls that joined several waiting requests.
    pub embed_batches: AtomicU64,
    /// Most generations one forward pass has advanced together (continuous batching).
    pub batch_sequences_peak: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_timed_out: AtomicU64,
    pub responses_stalled: AtomicU64,
    pub malformed: AtomicU64,
    pub audit_free_bytes: AtomicU64,
    /// Requests hyper handed to the application (each has exactly one `request` record, or is
    /// counted in a `refused_summary`).
    pub dispatched: AtomicU64,
    pub audit_disk_low: AtomicBool,
}

/// Shared by every handler.
pub struct AppState {
    /// The settings; a SIGHUP may replace the live ones (`config::LIVE_KEYS`).
    pub config: config::LiveConfig,
    pub state_dir: std::path::PathBuf,
    pub lockdown: std::sync::atomic::AtomicBool,
    pub audit: crate::audit::AuditLog,
    pub started: u64,
    /// The served models, by API name.
    pub models: models::ModelSet,
    /// Starts a model's new version (for a replacement).
    pub starter: models::Starter,
    pub tokens: auth::TokenCache,
    pub limiters: auth::Limiters,
    pub metrics: Arc<Metrics>,
    pub proxies: client::TrustedProxies,
    /// Every request's pending audit record ([`ledger`]).
    pub ledgers: Arc<ledger::Ledgers>,
    /// Flips to true when shutdown begins: running requests end with `shutdown`.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Held by each short round of a background task that records (the token reloader with
    /// its spool ingestion, lockdown and token events; the refusal summaries), and by the
    /// shutdown from before `server_stop` to the end: once it has it, those tasks record
    /// nothing more and stop, so `server_stop` is the last record.
    pub background: tokio::sync::Mutex<()>,
    /// The same for a SIGHUP reload, which can take minutes (model starts): its own gate, so
    /// that token revocations and lockdown are not held up while it runs.
    pub reloads: tokio::sync::Mutex<()>,
    /// Set once the shutdown holds the gates: background tasks stop at their next round. Not
    /// before: through the drain, revocations, lockdown and spooled actions still apply.
    pub recording_closed: std::sync::atomic::AtomicBool,
}

impl AppState {
    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Waits (at most `limit`) for a background task's round, a reload or a model replacement
    /// to finish and keeps new ones out: those that come later see
    /// [`AppState::shutting_down`] and record nothing. Held until the server's last record is
    /// written. `None` when `limit` passed first.
    pub async fn quiesce_changes(
        &self,
        limit: Duration,
    ) -> Option<[tokio::sync::MutexGuard<'_, ()>; 3]> {
        // No task holds one of these while waiting for an earlier one: a reload takes
        // `reloads`, then `replacing` inside each replacement; the others take one each.
        let all = async {
            let background = self.background.lock().await;
            let reloads = self.reloads.lock().await;
            let replacing = self.models.replacing.lock().await;
            [background, reloads, replacing]
        };
        let held = tokio::time::timeout(limit, all).await.ok();
        self.recording_closed.store(true, Ordering::SeqCst);
        held
    }

    /// Whether background tasks must record nothing more (the shutdown closed the log).
    pub fn recording_closed(&self) -> bool {
        self.recording_closed.load(Ordering::SeqCst)
    }

    /// Starts the shutdown of running requests (streams end with a final error event).
    pub fn begin_shutdown(&self) {
        self.ledgers.shutting_down.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
    }
}

/// Connection events: metrics, and malformed requests recorded like other anonymous refusals.
pub struct ServerEvents(pub Arc<AppState>);

impl connections::ConnectionEvents for ServerEvents {
    fn refused(&self, _peer: SocketAddr, per_client: bool) {
        self.0
            .metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(per_client, "connection refused: cap reached");
    }

    fn timed_out(&self, _peer: SocketAddr, stalled: bool) {
        let m = &self.0.metrics;
        if stalled {
            m.responses_stalled.fetch_add(1, Ordering::Relaxed);
        } else {
            m.connections_timed_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn malformed(&self, peer: SocketAddr, status: u16) {
        let state = &self.0;
        state.metrics.malformed.fetch_add(1, Ordering::Relaxed);
        // A request too, for the count in `server_stop`.
        state.metrics.dispatched.fetch_add(1, Ordering::Relaxed);
        let mut record = crate::audit::AuditRecord::event("request");
        record.request_id = Some(openai::request_id("req"));
        record.client = Some(state.audit.pseudonym(&peer.ip().to_string()));
        record.route = Some("(malformed HTTP, refused by the parser)".into());
        let ledger = Ledger::open(record, peer.ip(), &state.ledgers);
        tokio::spawn(async move {
            let _ = ledger
                .finish(Fate {
                    status: Some(status),
                    outcome: "refused_malformed",
                    prompt_tokens: None,
                    completion_tokens: None,
                })
                .await;
        });
    }

    fn open(&self, count: usize) {
        self.0
            .metrics
            .connections_open
            .store(count as u64, Ordering::Relaxed);
    }

    fn shared_peer(&self, peer: SocketAddr) -> bool {
        self.0.proxies.contains(peer.ip())
    }

    fn dispatched(&self, req: &mut Request) {
        self.0.metrics.dispatched.fetch_add(1, Ordering::Relaxed);
        open_ledger(&self.0, req);
    }
}

/// Every route the server registers, with its method; the deny-by-default test walks this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/example"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/rerank"),
    ("POST", "/rerank"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/admin/tokens"),
    ("POST", "/admin/tokens"),
    ("DELETE", "/admin/tokens/example"),
    ("POST", "/admin/lockdown"),
    ("POST", "/admin/models/example/reload"),
];

/// The application: routes behind body bounds, authentication and the audit ledger (outermost).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        // Liveness: the process answers (a restart would not help anything else).
        .route("/healthz", get(|| async { "ok\n" }))
        // Readiness: whether requests sent here now can be served.
        .route("/readyz", get(lifecycle::readiness))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/rerank", post(openai::rerank))
        .route("/rerank", post(openai::rerank))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route(
            "/admin/tokens",
            get(openai::admin_list_tokens).post(openai::admin_create_token),
        )
        .route(
            "/admin/tokens/{id}",
            axum::routing::delete(openai::admin_revoke_token),
        )
        .route("/admin/lockdown", post(openai::admin_lockdown))
        .route(
            "/admin/models/{name}/reload",
            post(openai::admin_reload_model),
        )
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such route",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.get().max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            body::buffer_body,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // Outside authentication (a preflight carries no token, and must not count as a failed
        // one), inside the audit ledger (every request, preflights too, is accounted for).
        .layer(cors(&state.config.get().cors_allowed_origins))
        .layer(middleware::from_fn(options_only_as_preflight))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            audit_requests,
        ))
        .with_state(state)
}

/// `OPTIONS` is answered only as a CORS preflight (with `Origin` and
/// `Access-Control-Request-Method`), the same way for every path; any other `OPTIONS` is a 405
/// without an `Allow` header. Otherwise an anonymous `OPTIONS` (which passes authentication, as
/// preflights must) would tell which routes and methods exist.
async fn options_only_as_preflight(req: Request, next: Next) -> Response {
    let preflight = req.headers().contains_key(axum::http::header::ORIGIN)
        && req
            .headers()
            .contains_key(axum::http::header::ACCESS_CONTROL_REQUEST_METHOD);
    if req.method() == axum::http::Method::OPTIONS && !preflight {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "OPTIONS is answered only as a CORS preflight",
        )
        .into_response();
    }
    next.run(req).await
}

/// CORS for the configured origins only (validated at start; none by default: then no
/// response carries CORS headers and preflights are answered without them, so browsers on
/// other origins cannot read anything). Bearer tokens, never cookies: no credentials mode.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(600))
}

/// The outcome to record for a response, when its status alone does not say it.
#[derive(Clone, Copy)]
pub struct RecordedOutcome(pub &'static str);

fn refused(resp: impl IntoResponse, outcome: &'static str) -> Response {
    let mut resp = resp.into_response();
    resp.extensions_mut().insert(RecordedOutcome(outcome));
    resp
}

/// Deny by default: every request except [`auth::PUBLIC`] paths needs a valid token with the
/// route's scope. A valid token is served even from an address that is locked out after failed
/// authentications: the lockout only makes further failures cheap to refuse.
async fn authorize(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    if auth::PUBLIC.contains(&path.as_str()) {
        return next.run(req).await;
    }
    let ip = client::limit_key(
        req.extensions()
            .get::<client::ClientIp>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0),
    );
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let mut authenticated = auth::authenticate(&state.tokens, header);
    if let Err(crate::tokens::Rejection::Unknown) = authenticated {
        // Perhaps created a moment ago: look at the store now (a stat, and a read only if it
        // changed) rather than at the next periodic reload.
        if state.tokens.refresh().is_ok() {
            authenticated = auth::authenticate(&state.tokens, header);
        }
    }
    let caller = match authenticated {
        Ok(c) => c,
        Err(rejection) => {
            if let Some(wait) = state.limiters.locked_out(ip) {
                state.metrics.lockouts.fetch_add(1, Ordering::Relaxed);
                state.metrics.limited.fetch_add(1, Ordering::Relaxed);
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "locked_out",
                    "too many failed authentications from this client; retry later",
                );
                e.retry_after = Some(wait);
                return refused(e, "refused_locked_out");
            }
            if state.limiters.failed_auth(ip) {
                // Recorded once, when the lockout begins.
                let mut r = crate::audit::AuditRecord::event("client_locked_out");
                r.client = Some(state.audit.pseudonym(&ip.to_string()));
                let _ = state.audit.append(r).await;
            }
            state.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(reason = ?rejection, "unauthenticated request refused");
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
    if let Some(ledger) = req.extensions().get::<Ledger>() {
        ledger.update(|r| r.token_id = Some(caller.token_id.clone()));
    }
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
        return refused(e, "refused_lockdown");
    }
    // A token of either model scope may list the models it can use.
    let lists_models = (path == "/v1/models" || path.starts_with("/v1/models/"))
        && caller
            .record
            .scopes
            .contains(&crate::tokens::Scope::Embeddings);
    if !caller.record.scopes.contains(&scope) && !lists_models {
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
    tracing::debug!(token = %caller.token_id, path = %path, "request");
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The texts of a request (and its completion), for `--audit-content hmac|full`.
#[derive(Debug, Clone, Default)]
pub struct Content {
    pub texts: Vec<String>,
    /// The answers, one per prompt (none for embeddings or an interrupted stream).
    pub completions: Vec<String>,
}

/// Token counts a handler reports for the audit record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache (reported to the client as OpenAI's
    /// `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        401 => "refused_unauthenticated",
        403 => "refused_forbidden",
        404 => "not_found",
        408 => "refused_body_timeout",
        413 => "refused_too_large",
        431 => "refused_header_too_large",
        429 => "refused_rate_limited",
        400..=499 => "refused_bad_request",
        503 => "refused_unavailable",
        _ => "error",
    }
}

/// Marks a streamed response: its stream task owns the request's audit record.
#[derive(Clone, Copy)]
pub struct Streaming;

/// The size of the request line and headers, as the client sent them (approximately: names,
/// values and separators).
fn head_bytes(req: &Request) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// Outermost layer: opens the request's audit record ([`ledger`]) and writes it, durably,
/// before an ordinary response leaves. A request whose record cannot be written is answered
/// 503 instead; a streamed one hands its record to the stream task.
async fn audit_requests(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let ledger = match req.extensions().get::<Ledger>() {
        Some(l) => l.clone(),
        None => open_ledger(&state, &mut req),
    };
    let request_id = ledger.request_id().to_string();
    if head_bytes(&req) > state.config.get().max_header_bytes {
        let e = ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            "header_too_large",
            format!(
                "the request line and headers exceed {} bytes",
                state.config.get().max_header_bytes
            ),
        );
        return finish(&state, &ledger, &request_id, e.into_response()).await;
    }
    // A broken log refuses work before any is done; the writer retries every second and says,
    // in its first record after, what failed and for how long.
    if !state.audit.healthy() {
        let _ = ledger
            .finish(Fate {
                status: Some(503),
                outcome: "refused_unavailable",
                prompt_tokens: None,
                completion_tokens: None,
            })
            .await;
        return audit_unavailable(&state);
    }
    let resp = next.run(req).await;
    if resp.extensions().get::<Streaming>().is_some() {
        return with_request_id(resp, &request_id);
    }
    finish(&state, &ledger, &request_id, resp).await
}

/// Opens a request's audit record and attributes it to its client (through a trusted proxy if
/// one forwarded it); both go into the request's extensions.
pub fn open_ledger(state: &Arc<AppState>, req: &mut Request) -> Ledger {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let ip = state.proxies.client(peer, req.headers());
    let mut record = crate::audit::AuditRecord::event("request");
    record.request_id = Some(openai::request_id("req"));
    record.client = Some(state.audit.pseudonym(&ip.to_string()));
    record.route = Some(format!(
        "{} {}",
        req.method(),
        ledger::bounded_path(req.uri().path())
    ));
    let ledger = Ledger::open(record, ip, &state.ledgers);
    req.extensions_mut().insert(client::ClientIp(ip));
    req.extensions_mut().insert(ledger.clone());
    ledger
}

/// Writes the record of an ordinary response, then releases the response.
async fn finish(
    state: &AppState,
    ledger: &Ledger,
    request_id: &str,
    mut resp: Response,
) -> Response {
    let status = resp.status();
    let recorded = resp
        .extensions()
        .get::<RecordedOutcome>()
        .map_or_else(|| outcome(status), |o| o.0);
    let usage = resp.extensions().get::<Usage>().copied();
    if let Some(c) = resp.extensions_mut().remove::<Content>() {
        ledger.update(|r| record_content(state, r, c));
    }
    let fate = Fate {
        status: Some(status.as_u16()),
        outcome: recorded,
        prompt_tokens: usage.map(|u| u.prompt_tokens),
        completion_tokens: usage.map(|u| u.completion_tokens),
    };
    if ledger.finish(fate).await.is_err() {
        return audit_unavailable(state);
    }
    with_request_id(resp, request_id)
}

fn with_request_id(mut resp: Response, request_id: &str) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Adds the texts of a request to its record as `--audit-content` says — only for a token whose
/// holder consented (`token create --consent-content`); for any other, nothing of the content.
pub fn record_content(state: &AppState, record: &mut crate::audit::AuditRecord, c: Content) {
    // The common case (no content kept) costs nothing on the request path.
    if state.config.get().audit_content == config::AuditContent::None {
        return;
    }
    let consented = record.token_id.as_ref().is_some_and(|id| {
        state
            .tokens
            .records()
            .iter()
            .any(|t| &t.id == id && t.consent_content.is_some())
    });
    if !consented {
        return;
    }
    match state.config.get().audit_content {
        config::AuditContent::None => {}
        config::AuditContent::Hmac => {
            record.content_hmac = Some(c.texts.iter().map(|t| state.audit.pseudonym(t)).collect());
        }
        config::AuditContent::Full => {
            // One answer keeps the record's long-standing shape; several are a list.
            record.content = Some(match c.completions.len() {
                0 | 1 => serde_json::json!({"texts": c.texts, "completion": c.completions.first()}),
                _ => serde_json::json!({"texts": c.texts, "completions": c.completions}),
            });
        }
    }
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
    let counters: [(&str, &str, u64); 23] = [
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
            "token_store_errors_total",
            "failed reads of the token store (the last good token set stays in force)",
            get(&m.token_store_errors),
        ),
        (
            "jobs_dropped_total",
            "queued jobs dropped unrun because their client left or their deadline passed",
            get(&m.jobs_dropped),
        ),
        (
            "embedding_batches_total",
            "embedding calls that joined several waiting requests into one",
            get(&m.embed_batches),
        ),
        (
            "connections_refused_total",
            "connections closed on accept because a connection cap was reached",
            get(&m.connections_refused),
        ),
        (
            "connections_timed_out_total",
            "connections closed for idling (no request in flight)",
            get(&m.connections_timed_out),
        ),
        (
            "responses_stalled_total",
            "responses cut off because the client stopped reading",
            get(&m.responses_stalled),
        ),
        (
            "malformed_requests_total",
            "requests refused by the HTTP parser before any handler",
            get(&m.malformed),
        ),
        (
            "requests_summarized_total",
            "anonymous refusals counted in refused_summary records instead of one record each",
            get(&state.ledgers.refusals.summarized),
        ),
        (
            "audit_faults_total",
            "times the audit log became unwritable (write, sync, checkpoint, sink, or a live file deleted)",
            get(&state.audit.counters.faults),
        ),
        (
            "audit_records_refused_total",
            "audit records that could not be written (their requests were refused)",
            get(&state.audit.counters.records_refused),
        ),
        (
            "audit_sink_errors_total",
            "signed checkpoints a syslog or journald sink did not accept",
            get(&state.audit.counters.sink_errors),
        ),
        (
            "audit_stream_dropped_total",
            "audit records an --audit-stream could not take or send (the log itself has them)",
            get(&state.audit.counters.stream_dropped),
        ),
        (
            "audit_files_restored_total",
            "live audit files found deleted or replaced and restored",
            get(&state.audit.counters.files_restored),
        ),
    ];
    let mut body: String = counters
        .iter()
        .map(|(name, help, v)| {
            format!("# HELP securerun_{name} {help}\n# TYPE securerun_{name} counter\nsecurerun_{name} {v}\n")
        })
        .collect();
    let gauges: [(&str, &str, u64); 6] = [
        (
            "batch_sequences_peak",
            "most generations one forward pass has advanced together",
            get(&m.batch_sequences_peak),
        ),
        (
            "lockdown",
            "1 while the server refuses every non-admin request",
            u64::from(state.lockdown.load(Ordering::Relaxed)),
        ),
        (
            "connections_open",
            "connections open now",
            get(&m.connections_open),
        ),
        (
            "audit_free_bytes",
            "free space on the audit log's volume",
            get(&m.audit_free_bytes),
        ),
        (
            "audit_disk_low",
            "1 while the audit volume has less free space than audit_min_free_mb",
            u64::from(m.audit_disk_low.load(Ordering::Relaxed)),
        ),
        (
            "audit_healthy",
            "1 while the audit log accepts writes",
            u64::from(state.audit.healthy()),
        ),
    ];
    for (name, help, v) in gauges {
        body.push_str(&format!(
            "# HELP securerun_{name} {help}\n# TYPE securerun_{name} gauge\nsecurerun_{name} {v}\n"
        ));
    }
    // Seconds, not microseconds (Prometheus' base unit).
    body.push_str(&format!(
        "# HELP securerun_audit_write_seconds_total time spent waiting for durable audit writes (divide by securerun_audit_records_total for the mean)\n# TYPE securerun_audit_write_seconds_total counter\nsecurerun_audit_write_seconds_total {}\n",
        get(&state.audit.write_us) as f64 / 1e6
    ));
    state.ledgers.http.render(&mut body);
    // Per model: queue, batch, latency and token counts of each engine.
    let models = state.models.all();
    let engines: Vec<_> = models
        .iter()
        .map(|m| {
            (
                m.name().to_string(),
                m.engine.queue_depth(),
                &*m.engine.metrics,
            )
        })
        .collect();
    engine::metrics::render(&engines, &mut body);
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
        spawn_refusal_summaries(state.clone());
        let mut last_disk_check: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            let _recording = state.background.lock().await;
            // Through the drain it goes on (a revocation still applies); once the shutdown
            // holds the gate, nothing more is recorded.
            if state.recording_closed() {
                break;
            }
            if let Err(e) = state.tokens.refresh() {
                state
                    .metrics
                    .token_store_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "token store unreadable; keeping the last good token set");
            }
            if last_disk_check.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                last_disk_check = Some(std::time::Instant::now());
                check_audit_space(&state);
            }
            // A `securerun reload` waiting: run it beside this loop (a model start takes time).
            for request in crate::reload::take(&state.state_dir) {
                let state = state.clone();
                tokio::spawn(async move {
                    let outcomes =
                        models::replace_named(&state, &request.models, "securerun reload").await;
                    let answer = crate::reload::Answer {
                        nonce: request.nonce,
                        outcomes,
                    };
                    if let Err(e) = crate::reload::answer(&state.state_dir, &answer) {
                        tracing::error!(error = %e, "cannot answer securerun reload");
                    }
                });
            }
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
            // What this server observed in the store, under names of its own: the operator's
            // action (`token_created`, `token_revoked`) is recorded once, by whoever took it,
            // and an auditor counting actions must not count the pick-up as a second one.
            let mut events = Vec::new();
            for (id, expired) in &current {
                match known.get(id) {
                    None => events.push(("token_loaded", id)),
                    Some(false) if *expired => events.push(("token_expired", id)),
                    _ => {}
                }
            }
            for id in known.keys() {
                if !current.contains_key(id) {
                    events.push(("token_unloaded", id));
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

/// Writes the counted anonymous refusals every [`ledger::SUMMARY_EVERY`], in its own task so a
/// flood's bookkeeping never delays token reloads, revocations or lockdown.
fn spawn_refusal_summaries(state: Arc<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ledger::SUMMARY_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            let _recording = state.background.lock().await;
            // The shutdown writes the last summaries itself, before `server_stop`.
            if state.recording_closed() {
                break;
            }
            write_refusal_summaries(&state.audit, &state.ledgers).await;
        }
    });
}

/// Writes the pending `refused_summary` records: handed over together, one durable wait.
pub async fn write_refusal_summaries(audit: &crate::audit::AuditLog, ledgers: &ledger::Ledgers) {
    let mut records = ledgers.refusals.drain();
    if let Some(last) = records.pop() {
        for r in records {
            audit.submit(r);
        }
        let _ = audit.append(last).await;
    }
}

/// Updates the audit volume's free-space gauge and warns when it runs low.
fn check_audit_space(state: &AppState) {
    let Some(free) = free_bytes(&crate::audit::audit_dir(&state.state_dir)) else {
        return;
    };
    state
        .metrics
        .audit_free_bytes
        .store(free, Ordering::Relaxed);
    let low = free < state.config.get().audit_min_free_mb.saturating_mul(1 << 20);
    let was = state.metrics.audit_disk_low.swap(low, Ordering::Relaxed);
    if low && !was {
        tracing::warn!(
            free_mib = free >> 20,
            threshold_mib = state.config.get().audit_min_free_mb,
            "the audit log's volume is running out of space; when it is full, requests are refused"
        );
    }
}

fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs with a NUL-terminated path and a zeroed out-struct it fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
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
        lifecycle::stopping();
    }
}

/// How long in-flight requests get to finish after a shutdown signal.
pub const DRAIN: Duration = Duration::from_secs(30);
