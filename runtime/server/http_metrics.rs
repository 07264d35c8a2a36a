//! Request metrics for `/metrics`: one latency histogram per (route, status class, model),
//! observed when a request's audit record is finished (so a stream counts to its end). Every
//! label comes from a closed set — the router's routes (anything else is `other`), five status
//! classes, and the names of served models (the only model names a record ever carries) — so
//! no client can grow the number of series.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use super::engine::metrics::{Histogram, SECONDS};

/// One series' labels.
type Key = (&'static str, &'static str, String);

#[derive(Default)]
pub struct HttpMetrics {
    series: Mutex<BTreeMap<Key, Arc<Histogram>>>,
}

impl HttpMetrics {
    /// Counts one request to `path` that ended with `status` after `elapsed`.
    pub fn observe(&self, path: &str, status: u16, model: Option<&str>, elapsed: Duration) {
        let key = (
            route_label(path),
            status_class(status),
            model.unwrap_or("").to_string(),
        );
        let h = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(Histogram::new(SECONDS)))
            .clone();
        h.observe(elapsed.as_secs_f64());
    }

    /// The `securerun_http_request_duration_seconds` family.
    pub fn render(&self, out: &mut String) {
        let name = "http_request_duration_seconds";
        out.push_str(&format!(
            "# HELP securerun_{name} time from a request's arrival to its end (a stream's last byte), by route, status class and model\n# TYPE securerun_{name} histogram\n"
        ));
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        for ((route, class, model), h) in series.iter() {
            // Route templates, classes and served model names (checked names: no quote,
            // backslash or newline) need no escaping.
            let labels = format!("route=\"{route}\",code=\"{class}\",model=\"{model}\"");
            h.render_series(name, &labels, out);
        }
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The route templates of [`super::ROUTES`] (`example` segments are parameters).
static TEMPLATES: LazyLock<Vec<(Vec<&'static str>, &'static str)>> = LazyLock::new(|| {
    let mut seen = std::collections::BTreeSet::new();
    super::ROUTES
        .iter()
        .filter(|(_, path)| seen.insert(*path))
        .map(|(_, path)| {
            let label: &'static str = Box::leak(path.replace("example", "{name}").into_boxed_str());
            (path.split('/').collect(), label)
        })
        .collect()
});

/// A request method from the closed set of HTTP's own (`other` for any extension method a
/// client made up): what logs may carry.
pub fn method_label(method: &str) -> &'static str {
    const METHODS: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    METHODS
        .iter()
        .copied()
        .find(|m| *m == method)
        .unwrap_or("other")
}

/// The route a path belongs to, as a template (`/v1/models/{name}`), or `other`.
pub fn route_label(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    TEMPLATES
        .iter()
        .find(|(template, _)| {
            template.len() == segments.len()
                && template
                    .iter()
                    .zip(&segments)
                    .all(|(t, s)| *t == "example" || t == s)
        })
        .map_or("other", |(_, label)| label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_routes_become_labels() {
        assert_eq!(route_label("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(route_label("/v1/models/smollm2"), "/v1/models/{name}");
        assert_eq!(route_label("/v1/models/a/b"), "other");
        assert_eq!(route_label("/v1/x\"}\n"), "other");
        assert_eq!(route_label("/healthz?x=1"), "/healthz");
        assert_eq!(method_label("POST"), "POST");
        assert_eq!(method_label("INJECTED-srt_abc"), "other");
    }
}
