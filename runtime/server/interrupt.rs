//! What can end a request that is already running, besides its own completion: its deadline,
//! the revocation or expiry of its token, lockdown (for non-admin work), and server shutdown.
//! Handlers race their work against [`interrupted`]; the engine job is then cancelled.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::auth::Caller;
use super::openai::ApiError;
use super::AppState;

/// How often authorization is re-checked while a request runs (the token cache itself is
/// refreshed every [`super::auth::RELOAD`]): revocation ends work within a second.
const RECHECK: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    Deadline,
    Revoked,
    Expired,
    Lockdown,
    Shutdown,
}

impl Interruption {
    /// The outcome recorded in the audit log.
    pub fn outcome(self) -> &'static str {
        match self {
            Interruption::Deadline => "timeout",
            Interruption::Revoked => "token_revoked",
            Interruption::Expired => "token_expired",
            Interruption::Lockdown => "lockdown",
            Interruption::Shutdown => "shutdown",
        }
    }

    /// The error a client gets (as a response, or as a stream's final event).
    pub fn error(self) -> ApiError {
        let (status, kind, code, message) = match self {
            Interruption::Deadline => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "timeout",
                "generation timed out",
            ),
            Interruption::Revoked => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "token_revoked",
                "the token was revoked while the request ran",
            ),
            Interruption::Expired => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "token_expired",
                "the token expired while the request ran",
            ),
            Interruption::Lockdown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "lockdown",
                "the server went into lockdown; only administrative requests are served",
            ),
            Interruption::Shutdown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutdown",
                "the server is shutting down",
            ),
        };
        ApiError::new(status, kind, code, message)
    }
}

/// Whether `caller` may still use the server now (non-admin work).
pub fn authorization_ended(state: &AppState, caller: &Caller) -> Option<Interruption> {
    if state.lockdown.load(Ordering::Relaxed) {
        return Some(Interruption::Lockdown);
    }
    let records = state.tokens.records();
    match records.iter().find(|r| r.id == caller.token_id) {
        None => Some(Interruption::Revoked),
        Some(r) if r.expired(crate::tokens::now()) => Some(Interruption::Expired),
        Some(_) => None,
    }
}

/// Why the engine ended a request its handler did not cancel (it ends jobs whose deadline has
/// passed, first of the two racing): the reason [`interrupted`] would give now, the deadline
/// when no other holds. Such a request is never a completion.
pub fn why_engine_stopped(state: &AppState, caller: &Caller) -> Interruption {
    if *state.shutdown.borrow() {
        return Interruption::Shutdown;
    }
    authorization_ended(state, caller).unwrap_or(Interruption::Deadline)
}

/// Resolves when the running request must stop.
pub async fn interrupted(state: &AppState, caller: &Caller, deadline: Instant) -> Interruption {
    let mut shutdown = state.shutdown.subscribe();
    let mut tick = tokio::time::interval(RECHECK);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => return Interruption::Deadline,
            _ = shutdown.wait_for(|down| *down) => return Interruption::Shutdown,
            _ = tick.tick() => {
                if let Some(why) = authorization_ended(state, caller) {
                    return why;
                }
            }
        }
    }
}
