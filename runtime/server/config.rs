//! Server settings: a TOML file (`--config`), overridden by flags, validated before anything
//! starts. Unknown keys are errors, so a typo cannot silently leave a default in place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How much request content reaches the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AuditContent {
    /// Counts and metadata only (default).
    None,
    /// Keyed HMACs of each text sent: testable, not readable.
    Hmac,
    /// The texts and completions themselves (encrypted in the log). Personal data: opt in.
    Full,
}

/// Generations batched together when `max_sequences` is not set (fewer if memory says so).
pub const DEFAULT_MAX_SEQUENCES: usize = 4;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// The name clients use for the model (default: the model's file or directory name).
    pub model_name: Option<String>,
    /// More models served by this process (`[[models]]` with `name`, `path` and optionally
    /// `signature`), each verified and in its own worker.
    pub models: Vec<super::models::ModelSpec>,
    pub max_body_bytes: usize,
    pub default_max_tokens: u32,
    pub max_tokens_cap: u32,
    /// Longest prompt accepted, in tokens (below the model's own context).
    pub max_prompt_tokens: usize,
    pub max_embedding_inputs: usize,
    /// Requests waiting behind the running one before 503.
    pub queue: usize,
    /// Generations advancing together in one forward pass (continuous batching); each holds
    /// its own KV cache. Unset: [`DEFAULT_MAX_SEQUENCES`], fewer if their KV caches do not fit
    /// a confined worker's memory budget. Set: exactly this many, or the model is refused.
    pub max_sequences: Option<usize>,
    #[serde(with = "secs")]
    pub generation_timeout: Duration,
    #[serde(with = "secs")]
    pub header_timeout: Duration,
    /// Connections open at once; more are closed on accept. Capped below the open-file limit.
    pub max_connections: usize,
    /// Connections open at once from one client address (the TCP peer).
    pub max_connections_per_client: usize,
    /// A connection with no request in flight (including one that sends only part of a
    /// request, a partial HTTP/2 preface or a TLS handshake) is closed after this long.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// A response that makes no progress for this long (the client stopped reading, or holds
    /// an HTTP/2 flow-control window at zero) is cut off and its generation cancelled.
    #[serde(with = "secs")]
    pub send_timeout: Duration,
    /// A request body must arrive whole within this long...
    #[serde(with = "secs")]
    pub body_timeout: Duration,
    /// ...and, after its first seconds, at no less than this many bytes per second.
    pub min_body_rate: u64,
    /// Request line and headers, in bytes; larger requests get 431 (before anything else).
    pub max_header_bytes: usize,
    /// Reverse proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the client.
    /// Nobody else's is believed.
    pub trusted_proxies: Vec<String>,
    /// Warn (log and `/metrics`) when the audit volume has less free space than this, MiB.
    pub audit_min_free_mb: u64,
    /// What of the prompts and completions the audit log keeps: none (default), hmac, full.
    pub audit_content: AuditContent,
    /// Start a new audit epoch (segment and key) after this long; retention shreds whole
    /// epochs, so this is its granularity. Default one day.
    #[serde(with = "secs")]
    pub audit_rotate: Duration,
    /// Where each signed audit checkpoint is also sent: `file:PATH` (another mount),
    /// `syslog[:SOCKET]`, `journald[:SOCKET]`. Added to `--checkpoint-sink`.
    pub checkpoint_sink: Vec<String>,
    /// Where every audit record is also sent once written, for a SIEM (no read key needed on
    /// the host): `syslog[:SOCKET]`, `unix:PATH`, `file:PATH`, then `,format=jsonl|ocsf` and
    /// `,fields=a+b+c` (content fields only when named). Added to `--audit-stream`.
    pub audit_stream: Vec<String>,
    /// Browser origins allowed to call the API (CORS), exactly as browsers send them
    /// (`https://app.example.org`, `http://localhost:3000`). None by default: browsers on other
    /// origins cannot read responses. Preflights are answered before authentication (they
    /// carry no token) and never count as failed authentications.
    pub cors_allowed_origins: Vec<String>,
    /// Failed authentications per client per minute before a one-minute lockout.
    pub auth_failures_per_min: u32,
    /// Precision of the weights (`--dtype` wins): auto, f32, bf16, f16, q8_0, q4_0, q4_k.
    pub dtype: Option<securerun_models::Precision>,
    /// Serve plain HTTP on a non-loopback address. Dangerous; for a TLS-terminating proxy on a
    /// private network only.
    pub insecure_public_http: bool,
}

mod secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            model_name: None,
            models: Vec::new(),
            max_body_bytes: 1 << 20,
            default_max_tokens: 256,
            max_tokens_cap: 4096,
            max_prompt_tokens: 4096,
            max_embedding_inputs: 256,
            queue: 16,
            max_sequences: None,
            generation_timeout: Duration::from_secs(300),
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_client: 64,
            idle_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            min_body_rate: 1024,
            max_header_bytes: 16 * 1024,
            trusted_proxies: Vec::new(),
            audit_min_free_mb: 512,
            auth_failures_per_min: 10,
            audit_content: AuditContent::None,
            audit_rotate: crate::audit::DEFAULT_ROTATE_AFTER,
            checkpoint_sink: Vec::new(),
            audit_stream: Vec::new(),
            cors_allowed_origins: Vec::new(),
            insecure_public_http: false,
            dtype: None,
        }
    }
}

impl ServeConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes =
            securerun_models::fsutil::read_bounded(path, 1 << 20).map_err(|e| e.to_string())?;
        let text =
            String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", path.display()))?;
        // The error names the key (its path through tables) and the line it is on.
        let located = |e: &toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => format!("{}, line {l}", path.display()),
                None => path.display().to_string(),
            }
        };
        let de = toml::Deserializer::parse(&text)
            .map_err(|e| format!("{}: {}", located(&e), e.message()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key.is_empty() || key == "." {
                format!("{}: {}", located(&inner), inner.message())
            } else {
                format!("{}: {key}: {}", located(&inner), inner.message())
            }
        })
    }

    /// Checks the combination of settings; the server does not start otherwise.
    pub fn validate(&self) -> Result<(), String> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".into());
        }
        if self.client_ca.is_some() && self.tls_cert.is_none() {
            return Err("--client-ca (mutual TLS) needs --tls-cert and --tls-key".into());
        }
        if self.tls_cert.is_none() && !self.listen.ip().is_loopback() && !self.insecure_public_http
        {
            return Err(format!(
                "refusing to serve plain HTTP on {}, which is not a loopback address: pass --tls-cert and --tls-key (or, behind a TLS-terminating proxy only, --insecure-public-http)",
                self.listen
            ));
        }
        if self.max_body_bytes < 1024 || self.queue == 0 || self.max_tokens_cap == 0 {
            return Err(
                "max_body_bytes >= 1024, queue >= 1 and max_tokens_cap >= 1 are required".into(),
            );
        }
        if self.max_sequences.is_some_and(|n| !(1..=256).contains(&n)) {
            return Err("max_sequences must be between 1 and 256".into());
        }
        if self.max_connections == 0 || self.max_connections_per_client == 0 {
            return Err("max_connections and max_connections_per_client must be at least 1".into());
        }
        for (name, d) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
            ("send_timeout", self.send_timeout),
            ("body_timeout", self.body_timeout),
            ("generation_timeout", self.generation_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be at least 1 second"));
            }
        }
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            return Err("max_header_bytes must be between 1024 and 1048576".into());
        }
        super::client::TrustedProxies::parse(&self.trusted_proxies)?;
        for s in &self.checkpoint_sink {
            s.parse::<crate::audit::SinkSpec>()?;
        }
        for s in &self.audit_stream {
            s.parse::<crate::audit::stream::StreamSpec>()?;
        }
        for origin in &self.cors_allowed_origins {
            check_origin(origin)?;
        }
        if self.audit_rotate < Duration::from_secs(1) {
            return Err("audit_rotate must be at least 1 second".into());
        }
        if self.default_max_tokens > self.max_tokens_cap {
            return Err("default_max_tokens exceeds max_tokens_cap".into());
        }
        Ok(())
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, http or https, nothing after.
fn check_origin(origin: &str) -> Result<(), String> {
    let bad = || {
        format!("cors_allowed_origins: {origin:?} is not an origin (scheme://host[:port], e.g. https://app.example.org; no wildcard, path or trailing slash)")
    };
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let host_ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !host_ok || axum::http::HeaderValue::from_str(origin).is_err() {
        return Err(bad());
    }
    Ok(())
}

/// The running server's settings: read per request (cheap: an `Arc` clone), replaced whole by a
/// reload that only changes [`LIVE_KEYS`].
pub struct LiveConfig(std::sync::RwLock<std::sync::Arc<ServeConfig>>);

impl LiveConfig {
    pub fn new(config: ServeConfig) -> Self {
        LiveConfig(std::sync::RwLock::new(std::sync::Arc::new(config)))
    }

    pub fn get(&self) -> std::sync::Arc<ServeConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The keys `new` changes, if all of them are [`LIVE_KEYS`]; otherwise the keys that need
    /// a restart. Changes nothing.
    pub fn check(&self, new: &ServeConfig) -> Result<Vec<&'static str>, Vec<&'static str>> {
        let changed = changed_keys(&self.get(), new);
        let restart: Vec<_> = changed
            .iter()
            .copied()
            .filter(|k| !LIVE_KEYS.contains(k))
            .collect();
        if restart.is_empty() {
            Ok(changed)
        } else {
            Err(restart)
        }
    }

    /// Serves requests with `new` from now on (after [`LiveConfig::check`] said it may).
    pub fn replace(&self, new: ServeConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(new);
    }
}

impl From<ServeConfig> for LiveConfig {
    fn from(config: ServeConfig) -> Self {
        LiveConfig::new(config)
    }
}

/// Keys a running server applies on reload (they are read per request); any other change
/// (listeners, TLS paths — the certificate itself reloads —, models, queues, connection
/// limits, audit plumbing) needs a restart.
pub const LIVE_KEYS: &[&str] = &[
    "default_max_tokens",
    "max_tokens_cap",
    "max_prompt_tokens",
    "max_embedding_inputs",
    "generation_timeout",
    "audit_content",
    "audit_min_free_mb",
];

/// The keys whose values differ.
fn changed_keys(old: &ServeConfig, new: &ServeConfig) -> Vec<&'static str> {
    macro_rules! differ {
        ($($key:ident),* $(,)?) => {{
            // Every field, listed: a field added to ServeConfig without a line here fails to
            // compile below (the destructuring is exhaustive).
            let ServeConfig { $($key: _),* } = old;
            let mut out = Vec::new();
            $(if old.$key != new.$key { out.push(stringify!($key)); })*
            out
        }};
    }
    differ!(
        listen,
        tls_cert,
        tls_key,
        client_ca,
        model_name,
        models,
        max_body_bytes,
        default_max_tokens,
        max_tokens_cap,
        max_prompt_tokens,
        max_embedding_inputs,
        queue,
        max_sequences,
        generation_timeout,
        header_timeout,
        max_connections,
        max_connections_per_client,
        idle_timeout,
        send_timeout,
        body_timeout,
        min_body_rate,
        max_header_bytes,
        trusted_proxies,
        audit_min_free_mb,
        audit_content,
        audit_rotate,
        checkpoint_sink,
        audit_stream,
        cors_allowed_origins,
        auth_failures_per_min,
        dtype,
        insecure_public_http,
    )
}
