//! API errors in OpenAI's JSON shape (`{"error": {message, type, param, code}}`), with the
//! headers and audit details they carry.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::server::auth::Limited;

/// An error in OpenAI's JSON shape.
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// The outcome for the audit record, when the status alone does not say it.
    pub outcome: Option<&'static str>,
    /// Token counts so far (a request interrupted while it ran); boxed, errors stay small.
    pub usage: Option<Box<crate::server::Usage>>,
    /// The request field at fault (OpenAI's `param`); boxed, errors stay small.
    pub param: Option<Box<str>>,
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
            outcome: None,
            usage: None,
            param: None,
        }
    }

    /// The error as one server-sent event (a stream's final word).
    pub fn event(&self) -> Event {
        Event::default().data(self.body().to_string())
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param.as_deref(), "code": self.code,
        }})
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    /// A 400 naming the request field at fault.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.param = Some(param.into().into_boxed_str());
        e
    }

    pub fn limited(l: Limited) -> Self {
        if l.never_fits {
            // Retrying cannot help: the client must ask for less.
            return Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request_exceeds_budget",
                l.what,
            );
        }
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
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(o) = self.outcome {
            resp.extensions_mut()
                .insert(crate::server::RecordedOutcome(o));
        }
        if let Some(u) = self.usage {
            resp.extensions_mut().insert(*u);
        }
        // Every 429 and 503 says when to come back (a client's backoff needs it), 1 s unless
        // the error knows better.
        let retry_after = self.retry_after.or_else(|| {
            matches!(
                self.status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            )
            .then_some(Duration::from_secs(1))
        });
        if let Some(after) = retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}
