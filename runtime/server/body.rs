//! Reading request bodies with every dimension bounded: size (413), total time and minimum
//! rate (408). Runs after authentication, so an anonymous client never gets a body read at
//! all; handlers then see the body already in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::openai::ApiError;
use super::AppState;

/// Bytes a body may lag behind `min_body_rate` before it is refused (a first TCP window).
const RATE_SLACK: u64 = 16 * 1024;
/// How often a slow body is checked against the rate.
const CHECK: Duration = Duration::from_millis(500);

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    TooLarge,
    TooSlow,
    Broken,
}

impl BodyError {
    fn response(&self, limit: usize) -> Response {
        match self {
            BodyError::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                format!("the request body exceeds {limit} bytes"),
            ),
            BodyError::TooSlow => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "body_timeout",
                "the request body arrived too slowly",
            ),
            BodyError::Broken => {
                // The client reset or closed while sending: its request ends here.
                let mut e = ApiError::bad_request("the request body could not be read");
                e.outcome = Some("client_closed");
                e
            }
        }
        .into_response()
    }
}

/// Reads `body` whole: at most `limit` bytes, within `timeout`, and never slower than
/// `min_rate` bytes per second (plus a small slack) once the first second has passed.
pub async fn read_bounded(
    mut body: Body,
    limit: usize,
    timeout: Duration,
    min_rate: u64,
) -> Result<Vec<u8>, BodyError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut buf = Vec::new();
    loop {
        let next_check = (Instant::now() + CHECK).min(deadline);
        match tokio::time::timeout_at(next_check.into(), body.frame()).await {
            Ok(None) => return Ok(buf),
            Ok(Some(Err(_))) => return Err(BodyError::Broken),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        return Err(BodyError::TooLarge);
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Err(_) => {}
        }
        let elapsed = started.elapsed();
        if Instant::now() >= deadline {
            return Err(BodyError::TooSlow);
        }
        if elapsed > Duration::from_secs(1) {
            let owed = (min_rate as f64 * elapsed.as_secs_f64()) as u64;
            if (buf.len() as u64) + RATE_SLACK < owed {
                return Err(BodyError::TooSlow);
            }
        }
    }
}

/// Middleware: buffers the body under the configured bounds before the handler runs.
pub async fn buffer_body(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let c = state.config.get();
    let (parts, body) = req.into_parts();
    match read_bounded(body, c.max_body_bytes, c.body_timeout, c.min_body_rate).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(e) => e.response(c.max_body_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dripping(bytes_per_tick: usize, ticks: usize, every: Duration) -> Body {
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            if i == ticks {
                return None;
            }
            tokio::time::sleep(every).await;
            let chunk = axum::body::Bytes::from(vec![b'x'; bytes_per_tick]);
            Some((Ok::<_, std::io::Error>(chunk), i + 1))
        });
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn a_body_slower_than_the_minimum_rate_is_refused_early() {
        let started = Instant::now();
        // 10 bytes every 100 ms = 100 B/s against a 1024 B/s minimum with 16 KiB slack: refused
        // once the slack is used up (about 16 s), well before the 60 s total timeout.
        let body = dripping(10, 100_000, Duration::from_millis(100));
        let r = read_bounded(body, 1 << 20, Duration::from_secs(60), 1024).await;
        assert_eq!(r, Err(BodyError::TooSlow));
        assert!(started.elapsed() < Duration::from_secs(25));
    }

    #[tokio::test]
    async fn bodies_are_capped_in_size_and_time() {
        let body = dripping(1000, 10, Duration::ZERO);
        assert_eq!(
            read_bounded(body, 5000, Duration::from_secs(5), 1).await,
            Err(BodyError::TooLarge)
        );
        let body = dripping(1, 1000, Duration::from_millis(100));
        let started = Instant::now();
        assert_eq!(
            read_bounded(body, 5000, Duration::from_secs(1), 0).await,
            Err(BodyError::TooSlow)
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        let body = dripping(100, 10, Duration::ZERO);
        assert_eq!(
            read_bounded(body, 5000, Duration::from_secs(5), 1024)
                .await
                .unwrap()
                .len(),
            1000
        );
    }
}
