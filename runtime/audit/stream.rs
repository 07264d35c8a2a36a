//! Record streams: every audit record, once it is written to the log, also goes to a SIEM the
//! site already runs — so live monitoring needs no read key on the host. A stream is
//! `TARGET[,format=jsonl|ocsf][,fields=a+b+c]`:
//!
//! - targets: `syslog[:SOCKET]` (RFC 5424 to `/dev/log`, facility log audit, MSGID
//!   `audit-record`), `unix:PATH` (one datagram per record, e.g. a Vector or Fluent Bit
//!   socket source), `file:PATH` (JSON lines, appended);
//! - `format`: the record as JSON (`jsonl`, default) or an OCSF 1.1 API Activity event
//!   (`ocsf`, class 6003) for SIEMs that ingest OCSF;
//! - `fields`: which record fields leave the host (default: every field except the content
//!   ones, `content` and `content_hmac`, which a site must name to send).
//!
//! Streams never slow the log: records are handed to one sender thread through a bounded
//! queue; a record that does not fit, or a send that fails, is counted
//! (`securerun_audit_stream_dropped_total`) and logged, never waited for. The log itself stays
//! the record of truth (`audit verify`); a stream is a copy for watching.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::AuditRecord;

/// Records waiting for the sender thread before new ones are dropped (and counted).
const QUEUE: usize = 4096;

/// The fields a stream may name (the record's own names).
const FIELDS: &[&str] = &[
    "time_ms",
    "event",
    "request_id",
    "token_id",
    "client",
    "end_user",
    "model",
    "route",
    "status",
    "outcome",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "content_hmac",
    "content",
    "detail",
    "count",
    "spooled",
    "epoch",
];

/// Sent only when a stream names them.
const CONTENT: &[&str] = &["content", "content_hmac"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Syslog(PathBuf),
    Unix(PathBuf),
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Ocsf,
}

/// One configured stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub target: Target,
    pub format: Format,
    pub fields: Vec<&'static str>,
}

impl std::str::FromStr for StreamSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let target = parts.next().unwrap_or_default();
        let (kind, arg) = target.split_once(':').unwrap_or((target, ""));
        let target = match kind {
            "syslog" => Target::Syslog(PathBuf::from(if arg.is_empty() {
                "/dev/log"
            } else {
                arg
            })),
            "unix" | "file" if !arg.starts_with('/') => {
                return Err(format!("{s:?}: the path must be absolute"))
            }
            "unix" => Target::Unix(arg.into()),
            "file" => {
                // Checked now, not at the first record: a typo must not start a server whose
                // stream silently drops everything.
                let path = PathBuf::from(arg);
                match path.parent().map(std::fs::metadata) {
                    Some(Ok(m)) if m.is_dir() => {}
                    _ => return Err(format!("{s:?}: the file's directory does not exist")),
                }
                if path.is_dir() {
                    return Err(format!("{s:?}: a directory, not a file"));
                }
                Target::File(path)
            }
            _ => {
                return Err(format!(
                    "{s:?}: an audit stream is syslog[:SOCKET], unix:PATH or file:PATH, then ,format=jsonl|ocsf and ,fields=a+b"
                ))
            }
        };
        let mut spec = StreamSpec {
            target,
            format: Format::Jsonl,
            fields: FIELDS
                .iter()
                .copied()
                .filter(|f| !CONTENT.contains(f))
                .collect(),
        };
        let mut seen = std::collections::BTreeSet::new();
        for option in parts {
            let key = option.split_once('=').map_or(option, |(k, _)| k);
            if !seen.insert(key) {
                return Err(format!("{s:?}: {key}= given twice"));
            }
            match option.split_once('=') {
                Some(("format", "jsonl")) => spec.format = Format::Jsonl,
                Some(("format", "ocsf")) => spec.format = Format::Ocsf,
                Some(("fields", list)) => {
                    spec.fields = list
                        .split('+')
                        .map(|f| {
                            FIELDS.iter().copied().find(|k| *k == f).ok_or_else(|| {
                                format!(
                                    "{s:?}: no record field {f:?} (fields: {})",
                                    FIELDS.join(", ")
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    if !spec.fields.contains(&"event") || !spec.fields.contains(&"time_ms") {
                        return Err(format!("{s:?}: fields must include time_ms and event"));
                    }
                }
                _ => {
                    return Err(format!(
                        "{s:?}: unknown option {option:?} (format=, fields=)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

/// The running streams: a queue to one sender thread.
pub struct Streams {
    tx: Option<SyncSender<AuditRecord>>,
    pub dropped: Arc<AtomicU64>,
    /// Records handed over and not yet sent.
    queued: Arc<AtomicU64>,
}

impl Streams {
    pub fn start(specs: Vec<StreamSpec>) -> Self {
        let dropped = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicU64::new(0));
        if specs.is_empty() {
            return Streams {
                tx: None,
                dropped,
                queued,
            };
        }
        let (tx, rx) = sync_channel::<AuditRecord>(QUEUE);
        let counter = dropped.clone();
        let in_queue = queued.clone();
        let spawned = std::thread::Builder::new()
            .name("securerun-audit-stream".into())
            .spawn(move || {
                let socket = UnixDatagram::unbound().ok();
                if let Some(s) = &socket {
                    let _ = s.set_nonblocking(true);
                }
                while let Ok(record) = rx.recv() {
                    for spec in &specs {
                        if let Err(e) = send(spec, socket.as_ref(), &record) {
                            counter.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(stream = ?spec.target, error = %e, "audit stream send failed");
                        }
                    }
                    in_queue.fetch_sub(1, Ordering::Relaxed);
                }
            });
        match spawned {
            Ok(_) => Streams {
                tx: Some(tx),
                dropped,
                queued,
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the audit stream thread");
                Streams {
                    tx: None,
                    dropped,
                    queued,
                }
            }
        }
    }

    /// Hands written records to the streams, never waiting.
    pub fn send(&self, records: &[&AuditRecord]) {
        let Some(tx) = &self.tx else { return };
        for r in records {
            self.queued.fetch_add(1, Ordering::Relaxed);
            match tx.try_send((*r).clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Waits up to `limit` for the records handed over to be sent (at a checkpoint, and so at
    /// shutdown, whose last records must not die in the queue with the process).
    pub fn drain(&self, limit: std::time::Duration) {
        let until = std::time::Instant::now() + limit;
        while self.queued.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

fn send(
    spec: &StreamSpec,
    socket: Option<&UnixDatagram>,
    record: &AuditRecord,
) -> std::io::Result<()> {
    let body = render(spec, record).to_string();
    let datagram = |path: &PathBuf, bytes: &[u8]| {
        socket
            .ok_or_else(|| std::io::Error::other("no datagram socket"))?
            .send_to(bytes, path)
            .map(drop)
    };
    match &spec.target {
        Target::Syslog(path) => datagram(
            path,
            super::sink::syslog_line("audit-record", &body).as_bytes(),
        ),
        Target::Unix(path) => datagram(path, body.as_bytes()),
        Target::File(path) => {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(path)?;
            f.write_all(format!("{body}\n").as_bytes())
        }
    }
}

/// The record's chosen fields, as JSON or as OCSF.
pub fn render(spec: &StreamSpec, record: &AuditRecord) -> Value {
    let projected = project(record, &spec.fields);
    match spec.format {
        Format::Jsonl => Value::Object(projected),
        Format::Ocsf => ocsf(projected),
    }
}

fn project(record: &AuditRecord, fields: &[&str]) -> Map<String, Value> {
    let Ok(Value::Object(all)) = serde_json::to_value(record) else {
        return Map::new();
    };
    all.into_iter()
        .filter(|(k, _)| fields.contains(&k.as_str()))
        .collect()
}

/// An OCSF 1.1 API Activity (class 6003) event from a record's fields. Fields with no OCSF
/// home go to `unmapped`.
pub fn ocsf(mut f: Map<String, Value>) -> Value {
    let mut take = |k: &str| f.remove(k);
    let time = take("time_ms").unwrap_or(Value::Null);
    let event = take("event").unwrap_or(Value::Null);
    let status = take("status");
    let outcome = take("outcome");
    let failed = status
        .as_ref()
        .and_then(Value::as_u64)
        .is_some_and(|s| s >= 400)
        || outcome
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|o| o.starts_with("refused") || o == "error" || o == "failed");
    // OCSF API Activity activities: 1 create, 2 read, 3 update, 4 delete, 99 other.
    let route = take("route");
    let method = route
        .as_ref()
        .and_then(Value::as_str)
        .and_then(|r| r.split_once(' '))
        .map(|(m, _)| m.to_string());
    let activity_id = match method.as_deref() {
        Some("POST") => 1,
        Some("GET") => 2,
        Some("PUT") | Some("PATCH") => 3,
        Some("DELETE") => 4,
        _ => 99,
    };
    let mut out = json!({
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "type_uid": 600300 + activity_id,
        "time": time,
        "severity_id": if failed { 3 } else { 1 },
        "status_id": if failed { 2 } else { 1 },
        "status": if failed { "Failure" } else { "Success" },
        "metadata": {
            "version": "1.1.0",
            "product": {"name": "securerun", "vendor_name": "securerun", "version": env!("CARGO_PKG_VERSION")},
            "event_code": event,
        },
    });
    let o = out.as_object_mut().expect("an object");
    if let Some(s) = status {
        o.insert("status_code".into(), Value::String(s.to_string()));
    }
    if let Some(outcome) = outcome {
        o.insert("status_detail".into(), outcome);
    }
    let request_id = take("request_id");
    let mut api = json!({"operation": route.clone().unwrap_or(Value::Null)});
    if let Some(id) = &request_id {
        api["request"] = json!({"uid": id});
    }
    if let Some(model) = take("model") {
        api["service"] = json!({"name": model});
    }
    o.insert("api".into(), api);
    if let Some(t) = take("token_id") {
        o.insert("actor".into(), json!({"user": {"uid": t, "type_id": 99}}));
    }
    if let Some(c) = take("client") {
        o.insert("src_endpoint".into(), json!({"uid": c}));
    }
    if let Some(ms) = take("latency_ms") {
        o.insert("duration".into(), ms);
    }
    if let Some(d) = take("detail") {
        o.insert("message".into(), d);
    }
    if !f.is_empty() {
        o.insert("unmapped".into(), Value::Object(f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_content_leaves_only_when_named() {
        let s: StreamSpec = "unix:/run/vector.sock,format=ocsf".parse().unwrap();
        assert_eq!(s.format, Format::Ocsf);
        assert!(!s.fields.contains(&"content"));
        assert!("tcp:1.2.3.4".parse::<StreamSpec>().is_err());
        assert!("file:relative.log".parse::<StreamSpec>().is_err());
        assert!("file:/nonexistent-dir/x".parse::<StreamSpec>().is_err());
        assert!("file:/tmp".parse::<StreamSpec>().is_err());
        assert!("unix:/x,format=ocsf,format=jsonl"
            .parse::<StreamSpec>()
            .is_err());
        assert!("file:/x,fields=event+password"
            .parse::<StreamSpec>()
            .is_err());
        assert!("file:/x,fields=outcome".parse::<StreamSpec>().is_err());
        let mut r = AuditRecord::event("request");
        r.content = Some(json!({"texts": ["secret"]}));
        r.status = Some(403);
        r.route = Some("POST /v1/chat/completions".into());
        let plain: StreamSpec = "file:/tmp/x".parse().unwrap();
        assert!(!render(&plain, &r).to_string().contains("secret"));
        let chosen: StreamSpec = "file:/tmp/x,fields=time_ms+event+content".parse().unwrap();
        assert!(render(&chosen, &r).to_string().contains("secret"));
        let o = render(&s, &r);
        assert_eq!(o["class_uid"], 6003);
        assert_eq!(o["activity_id"], 1);
        assert_eq!(o["status"], "Failure");
        assert_eq!(o["status_code"], "403");
    }
}
