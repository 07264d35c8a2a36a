//! The server's life under a service manager: systemd's readiness protocol (`Type=notify`:
//! READY once listening, RELOADING/READY around a reload, STOPPING at a shutdown signal,
//! WATCHDOG while the engine loop is alive) and SIGHUP, which re-reads the token store and the
//! TLS certificate and key, then replaces every model by its version on disk. Each reload step
//! is recorded in the audit log before it takes effect; a step that fails keeps what runs.

use std::sync::Arc;

use sd_notify::NotifyState;

use super::tls::ReloadableTls;
use super::AppState;
use crate::audit::AuditRecord;

/// Tells the service manager (if any: without `NOTIFY_SOCKET` this does nothing) `states`.
/// A manager that cannot be told is logged, never fatal: the server serves either way.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Listening: the manager may start what depends on the server.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A shutdown signal came: the manager waits for the drain.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining requests"),
    ]);
}

/// Pets systemd's watchdog (`WatchdogSec=`) at half its period while the runtime's timers run:
/// a server whose runtime is wedged stops petting and is restarted by the manager.
pub fn spawn_watchdog() {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    });
}

/// Reads the settings again (the config file, then the flags over it, validated).
pub type Reread = Box<dyn Fn() -> Result<super::ServeConfig, String> + Send + Sync>;

/// SIGHUPs from now on, queued until [`spawn_hangup_reloader`] runs them. Called first thing in
/// `serve` (inside the runtime) so that a SIGHUP during start-up, or just after "listening
/// on", is a reload once the server runs instead of its death by the signal's default action.
/// `None` (logged) when the handler cannot be installed; the server then serves without it.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot listen for SIGHUP; reload with the admin API or `securerun reload`"
            );
            None
        }
    }
}

/// Runs [`reload`] on every SIGHUP (`systemctl reload`, `kill -HUP`), including those that came
/// while the server started.
pub fn spawn_hangup_reloader(
    state: Arc<AppState>,
    tls: Option<Arc<ReloadableTls>>,
    reread: Reread,
    hangups: Option<tokio::signal::unix::Signal>,
) {
    let Some(mut hangups) = hangups else {
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reload(&state, tls.as_ref(), &reread).await;
        }
    });
}

/// One reload: the settings, tokens, then the TLS configuration, then every model. A step
/// that fails is recorded and logged, and what runs stays; the others go on.
pub async fn reload(state: &Arc<AppState>, tls: Option<&Arc<ReloadableTls>>, reread: &Reread) {
    let _one_at_a_time = state.reloads.lock().await;
    if state.shutting_down() {
        tracing::info!("reload skipped: the server is stopping");
        return;
    }
    let mut states = vec![NotifyState::Reloading];
    states.extend(NotifyState::monotonic_usec_now());
    notify(&states);
    reload_settings(state, reread).await;
    if let Err(e) = state.tokens.refresh() {
        tracing::error!(error = %e, "token store unreadable; keeping the last good token set");
    }
    if let Some(tls) = tls {
        reload_tls(state, tls).await;
    }
    for o in super::models::replace_named(state, &[], "SIGHUP").await {
        tracing::info!(
            model = o.model,
            replaced = o.replaced,
            detail = o.detail,
            "reload"
        );
    }
    ready("serving");
}

/// Re-reads the config file. New settings apply whole, and only once `config_reloaded` (the
/// keys that changed) is durable; a file that does not parse or validate, or that changes a key
/// only a restart can apply, is recorded as refused and changes nothing.
async fn reload_settings(state: &AppState, reread: &Reread) {
    let mut record = AuditRecord::event("config_reloaded");
    let new = match reread() {
        Ok(new) => new,
        Err(e) => {
            record.outcome = Some("refused".into());
            record.detail = Some(format!("kept the running settings: {e}"));
            tracing::error!(error = %e, "config reload refused; keeping the running settings");
            let _ = state.audit.append(record).await;
            return;
        }
    };
    let running = state.config.get();
    if *running == new {
        return;
    }
    // Checked before recording, applied after: a refusal changes nothing either way (only this
    // task replaces the settings, so nothing changes between the check and the swap).
    match state.config.check(&new) {
        Err(restart) => {
            record.outcome = Some("refused".into());
            record.detail = Some(format!(
                "kept the running settings: {} can only change with a restart",
                restart.join(", ")
            ));
            tracing::error!(keys = ?restart, "config reload refused: these keys need a restart");
            let _ = state.audit.append(record).await;
        }
        Ok(changed) => {
            record.outcome = Some("ok".into());
            record.detail = Some(format!("changed: {}", changed.join(", ")));
            if let Err(e) = state.audit.append(record).await {
                tracing::error!(error = %e, "cannot record the config reload; keeping the running settings");
                return;
            }
            state.config.replace(new);
            tracing::info!(keys = ?changed, "settings reloaded");
        }
    }
}

/// Re-reads the certificate and key; the new configuration serves new connections only once
/// its record (`tls_reloaded`, the new leaf's SHA-256) is durable. A configuration that does
/// not build (a broken chain, a key that does not match, an unreadable file) is recorded as
/// refused and the running one stays.
async fn reload_tls(state: &AppState, tls: &Arc<ReloadableTls>) {
    let mut record = AuditRecord::event("tls_reloaded");
    // File reads and key parsing off the async threads: a slow disk stalls only this reload.
    let reading = tls.clone();
    let prepared = tokio::task::spawn_blocking(move || reading.prepare())
        .await
        .unwrap_or_else(|_| Err("the TLS reload task failed".into()));
    match &prepared {
        Ok(p) => {
            record.outcome = Some("ok".into());
            record.detail = Some(format!(
                "certificate sha256 {} (was {})",
                p.fingerprint(),
                tls.fingerprint()
            ));
        }
        Err(e) => {
            record.outcome = Some("refused".into());
            record.detail = Some(format!("kept the running certificate: {e}"));
        }
    }
    if let Err(e) = state.audit.append(record).await {
        tracing::error!(error = %e, "cannot record the TLS reload; keeping the running certificate");
        return;
    }
    match prepared {
        Ok(p) => {
            tracing::info!(sha256 = p.fingerprint(), "TLS certificate reloaded");
            tls.install(p);
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS reload refused; keeping the running certificate")
        }
    }
}

/// `GET /readyz` (public, like `/healthz`): 200 when requests sent now can be served, else 503
/// with the reasons. Not ready: shutting down (draining), in lockdown, the audit log cannot be
/// written (every request would be refused), or a model's confined worker cannot start (its
/// weights no longer verify, say). A worker that just died is replaced by the next request,
/// so it does not make the server unready. No model names, token or client data: the probe is
/// unauthenticated.
pub async fn readiness(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> axum::response::Response {
    use crate::worker::WorkerState;
    use axum::response::IntoResponse;
    let mut reasons: Vec<String> = Vec::new();
    if *state.shutdown.borrow() {
        reasons.push("shutting down".into());
    }
    if state.lockdown.load(std::sync::atomic::Ordering::Relaxed) {
        reasons.push("in lockdown".into());
    }
    if !state.audit.healthy() {
        reasons.push("the audit log cannot be written".into());
    }
    let models = state.models.all();
    let (mut up, mut failed, mut unverified) = (0, 0, 0);
    for m in &models {
        match m.engine.worker.as_ref().map(|w| w.state()) {
            Some(WorkerState::Failed) => failed += 1,
            Some(WorkerState::Up) => up += 1,
            Some(WorkerState::Starting) | None => {}
        }
        unverified += usize::from(m.signer.is_none());
    }
    if failed > 0 {
        reasons.push(format!(
            "{failed} of {} models: the confined worker cannot start",
            models.len()
        ));
    }
    let ready = reasons.is_empty();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "reasons": reasons,
        "models": models.len(),
        "workers_up": up,
        // Served with --allow-unsigned (the operator's choice; reported, not refused).
        "models_unverified": unverified,
    });
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = (status, axum::Json(body)).into_response();
    if !ready {
        resp.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("5"),
        );
    }
    resp
}
