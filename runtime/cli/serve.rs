//! `securerun serve MODEL`: verify, start the confined worker, and only then listen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::serve_model::{default_name, ModelStarter};
use super::{CmdResult, RunModelArgs};
use crate::server::models::ModelSpec;
use crate::server::{self, auth, ServeConfig};
use crate::tokens::TokenStore;

#[derive(Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    common: RunModelArgs,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TOML configuration file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Server certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (mutual TLS).
    #[arg(long, value_name = "PEM")]
    client_ca: Option<PathBuf>,
    /// The model's name in the API (default: its file or directory name).
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,
    /// Serve another model from this process, under NAME (repeatable; also `[[models]]` in
    /// the config). Each is verified and runs in its own worker; one token store and one
    /// audit log serve them all.
    #[arg(long = "model", value_name = "NAME=PATH", value_parser = ModelSpec::parse_flag)]
    models: Vec<ModelSpec>,
    /// Allow plain HTTP on a non-loopback address (only behind a TLS-terminating proxy).
    #[arg(long)]
    insecure_public_http: bool,
    /// Audit durability: fsync each batch before answering (default), or buffered (survives a
    /// process crash, not a power loss).
    #[arg(long, value_enum, default_value = "fsync")]
    audit_sync: AuditSync,
    /// What of prompts and completions the audit log keeps: none (default), hmac (testable
    /// fingerprints), full (the texts, encrypted; personal data).
    #[arg(long, value_enum, value_name = "MODE")]
    audit_content: Option<server::config::AuditContent>,
    /// Also send every signed audit checkpoint to: file:PATH (e.g. another mount),
    /// syslog[:SOCKET], journald[:SOCKET]. Repeatable.
    #[arg(long, value_name = "SINK")]
    checkpoint_sink: Vec<crate::audit::SinkSpec>,
    /// Also send every audit record, once written, to a SIEM: syslog[:SOCKET], unix:PATH or
    /// file:PATH, then ,format=jsonl|ocsf and ,fields=a+b+c (content fields only when named).
    /// Live monitoring without the read key on the host. Repeatable.
    #[arg(long, value_name = "STREAM")]
    audit_stream: Vec<crate::audit::stream::StreamSpec>,
    /// For a new audit log: the auditor's recipient key (`audit keygen`), so that no read key
    /// is ever written to this host.
    #[arg(long, value_name = "RECIPIENT.PUB")]
    audit_recipient: Option<PathBuf>,
    /// Log lines on stderr: text, or json (one object per line). Each request ends with one
    /// access line (target `access`: request id, method, route, status, latency, token id,
    /// a client pseudonym keyed per run, model, outcome; never a secret, a raw path or content).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// How the server's own log lines (stderr) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for journald, Vector, Fluent Bit, Loki...).
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditSync {
    Fsync,
    Buffered,
}

pub fn run(args: ServeArgs) -> CmdResult {
    // Structured logs on stderr; `SECURERUN_LOG` filters (default info). Nothing logged carries
    // a token or prompt text: handlers log token ids and paths only.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SECURERUN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let _ = match args.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => logs.json().flatten_event(true).try_init(),
    };
    // The runtime and the SIGHUP handler before anything else: a reload asked for while the
    // server starts waits for it instead of killing it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("securerun-http")
        .build()?;
    let hangups = {
        let _entered = runtime.enter();
        server::lifecycle::hangups()
    };
    // SIGTERM and SIGINT likewise: one during start-up stops it at the next step, in order
    // (recorded, attested), instead of killing it mid-way.
    let stop = StopRequest::listen(&runtime);
    // Start-up notes and warnings: lines on stderr, or log events with --log-format json (so
    // every stderr line is JSON).
    let json = args.log_format == LogFormat::Json;
    let say = |warning: bool, msg: String| match (json, warning) {
        (true, true) => tracing::warn!("{msg}"),
        (true, false) => tracing::info!("{msg}"),
        (false, true) => eprintln!("warning: {msg}"),
        (false, false) => eprintln!("note: {msg}"),
    };
    let config = args.settings()?;
    if config.audit_content != server::config::AuditContent::None {
        say(
            false,
            format!(
                "audit content ({:?}) is recorded only for tokens created with --consent-content",
                config.audit_content
            ),
        );
    }
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(Arc::new(server::tls::ReloadableTls::load(
            server::tls::TlsFiles {
                cert: c.clone(),
                key: k.clone(),
                client_ca: config.client_ca.clone(),
            },
        )?)),
        _ => None,
    };
    if config.insecure_public_http && tls.is_none() {
        say(
            true,
            format!(
                "--insecure-public-http: serving plain HTTP on {}",
                config.listen
            ),
        );
    }
    let state_dir = args.common.trust.state_dir()?;
    // The audit log first: verification, sandbox and start-up are recorded, and a server that
    // cannot audit does not start.
    let audit_dir = crate::audit::audit_dir(&state_dir);
    let recipient = args
        .audit_recipient
        .as_deref()
        .map(crate::audit::Recipient::load)
        .transpose()?;
    if let Some(note) = super::created_note(&audit_dir, crate::audit::init(&audit_dir, recipient)?)
    {
        say(false, note);
    }
    // The read key decrypts every record: while it stays on the host, a thief of the disk
    // reads the whole log. Said at every start until it is moved.
    let read_key = audit_dir.join(crate::audit::recipient::READ_KEY);
    if std::fs::symlink_metadata(&read_key).is_ok() {
        say(true, format!(
            "{} is still on this host: anyone who can read it can read the whole audit log; move it off the host (auditors pass it back with --key)",
            read_key.display()
        ));
    }
    let durability = match args.audit_sync {
        AuditSync::Fsync => crate::audit::Durability::Fsync,
        AuditSync::Buffered => crate::audit::Durability::Buffered,
    };
    let mut sinks = args.checkpoint_sink.clone();
    for s in &config.checkpoint_sink {
        sinks.push(s.parse()?);
    }
    let audit = crate::audit::AuditLog::open_with(
        &audit_dir,
        crate::audit::WriterOptions {
            durability,
            rotate_after: config.audit_rotate,
            sinks,
            streams: args
                .audit_stream
                .iter()
                .cloned()
                .map(Ok)
                .chain(config.audit_stream.iter().map(|s| s.parse()))
                .collect::<Result<_, String>>()?,
            recipient: None,
        },
    )?;
    let tokens = auth::TokenCache::new(TokenStore::new(&state_dir))?;
    if tokens.records().is_empty() {
        say(false, format!(
            "no access tokens in {}: every request will be refused until you create one:\n  securerun token create --name NAME --scopes inference --state-dir {}",
            tokens.store_path().display(),
            state_dir.display()
        ));
    }

    // Verify, then start every model (confined unless --sandbox=off), then listen.
    if args.common.allow_unsigned {
        say(
            true,
            "--allow-unsigned given: the model's signature will not be required".into(),
        );
    }
    let mut opts = args.common.open_options()?;
    opts.precision = args.common.dtype.or(config.dtype).unwrap_or_default();
    let specs = args.model_specs(&config)?;
    // A `securerun reload` left while no server ran is not this server's business.
    drop(crate::reload::take(&state_dir));
    let sandbox = format!("{:?}", args.common.sandbox).to_lowercase();
    let metrics = Arc::new(server::Metrics::default());
    let starter = Arc::new(ModelStarter {
        opts: opts.clone(),
        worker: args.common.worker_settings()?,
        sandbox: sandbox.clone(),
        config: config.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        runtime: runtime.handle().clone(),
    });
    let mut served = Vec::with_capacity(specs.len());
    for spec in &specs {
        if stop.requested() {
            return stopped_during_start_up(&runtime, &audit);
        }
        served.push(starter.start(spec, 0)?);
    }
    if stop.requested() {
        return stopped_during_start_up(&runtime, &audit);
    }
    let model_ids = specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let models = server::models::ModelSet::new(served);
    let starter: server::models::Starter =
        Arc::new(move |spec, version| starter.start(spec, version));

    let open_files = server::connections::raise_open_file_limit();
    // Keep half of the descriptors for everything that is not a client connection.
    let max_connections = config.max_connections.min(
        usize::try_from(open_files / 2)
            .unwrap_or(usize::MAX)
            .max(16),
    );
    let limits = server::connections::ConnectionLimits {
        max_connections,
        max_connections_per_client: config.max_connections_per_client,
        idle_timeout: config.idle_timeout,
        send_timeout: config.send_timeout,
        max_head_bytes: config.max_header_bytes.saturating_mul(4).max(16 * 1024),
    };
    let proxies = server::client::TrustedProxies::parse(&config.trusted_proxies)?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let local = listener.local_addr()?;
        let mut start = crate::audit::AuditRecord::event("server_start");
        start.model = Some(model_ids.clone());
        start.detail = Some(format!(
            "listen {local}, tls {}, mtls {}, sandbox {sandbox}, dtype {}, audit {:?}, audit content {:?}, audit epoch every {} s, tokens {}, connections {max_connections} ({} per client), trusted proxies {}",
            tls.is_some(),
            config.client_ca.is_some(),
            opts.precision,
            durability,
            config.audit_content,
            config.audit_rotate.as_secs(),
            tokens.records().len(),
            config.max_connections_per_client,
            config.trusted_proxies.len()
        ));
        audit.append(start).await?;
        let stop_log = audit.clone();
        let state = Arc::new(server::AppState {
            lockdown: std::sync::atomic::AtomicBool::new(crate::lockdown::is_on(&state_dir)),
            state_dir: state_dir.clone(),
            ledgers: server::ledger::Ledgers::new(audit.clone()),
            audit,
            models,
            starter,
            proxies,
            shutdown: tokio::sync::watch::channel(false).0,
            background: tokio::sync::Mutex::new(()),
            reloads: tokio::sync::Mutex::new(()),
            recording_closed: Default::default(),
            started: crate::tokens::now(),
            tokens,
            limiters: auth::Limiters::new(config.auth_failures_per_min),
            metrics,
            config: config.clone().into(),
        });
        server::spawn_token_reloader(state.clone());
        let reread: server::lifecycle::Reread = {
            let args = args.clone();
            Box::new(move || args.settings())
        };
        server::lifecycle::spawn_hangup_reloader(state.clone(), tls.clone(), reread, hangups);
        server::lifecycle::spawn_watchdog();
        stop.listening();
        let stopping = state.clone();
        let shutdown = async move {
            stop.wait().await;
            // Running requests end now, each with its record (`shutdown`).
            stopping.begin_shutdown();
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        // One line a script can wait for.
        println!("listening on {scheme}://{local} (models {model_ids})");
        server::lifecycle::ready(&format!("listening on {scheme}://{local}"));
        let app = server::router(state.clone());
        server::connections::serve(
            listener,
            tls,
            app,
            limits,
            Arc::new(server::ServerEvents(state.clone())),
            shutdown,
            server::DRAIN,
        )
        .await;
        // Every request's record is written before the server's last ones.
        let unsettled = state.ledgers.settle(std::time::Duration::from_secs(10)).await;
        if unsettled > 0 {
            tracing::warn!(unsettled, "request records still open at exit");
        }
        // A reload or replacement still starting workers finishes first, and none starts after:
        // `server_stop` stays the last record, inside the final checkpoint.
        let quiet = state.quiesce_changes(server::DRAIN).await;
        if quiet.is_none() {
            tracing::warn!("a model replacement did not finish in time; stopping anyway");
        }
        // Refusals counted since the last summary are recorded too.
        server::write_refusal_summaries(&stop_log, &state.ledgers).await;
        // The server's own count, so an auditor can match it against the records: every
        // request has one `request` record or is counted in a `refused_summary`.
        let dispatched = state
            .metrics
            .dispatched
            .load(std::sync::atomic::Ordering::Relaxed);
        stop_log
            .append(
                crate::audit::AuditRecord::event("server_stop")
                    .with_detail(format!("{dispatched} requests since start")),
            )
            .await?;
        // The last checkpoint attests everything up to the stop record.
        tokio::task::spawn_blocking(move || stop_log.checkpoint_now()).await??;
        drop(quiet);
        Ok::<(), Box<dyn std::error::Error>>(())
    });
    // A worker start still running in a blocking task (a replacement the drain did not wait
    // out) must not hold the exit: its records could only follow `server_stop` anyway.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    served
}

/// A shutdown signal (SIGTERM, SIGINT), listened for from the start of `serve`.
struct StopRequest {
    asked: tokio::sync::watch::Receiver<bool>,
    listening: Arc<std::sync::atomic::AtomicBool>,
}

/// How long a start-up step may run on after a shutdown signal before the process exits without
/// waiting for it (a long verification or load; what a signal did before). Shorter than
/// systemd's default stop timeout (90 s).
const START_UP_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

impl StopRequest {
    fn listen(runtime: &tokio::runtime::Runtime) -> Self {
        let signal = {
            let _entered = runtime.enter();
            server::shutdown_signal()
        };
        let (tx, asked) = tokio::sync::watch::channel(false);
        let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = listening.clone();
        runtime.spawn(async move {
            signal.await;
            let _ = tx.send(true);
            tokio::time::sleep(START_UP_STOP_GRACE).await;
            if !started.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!(
                    "a start-up step did not end in time after the stop signal; exiting"
                );
                std::process::exit(128 + libc::SIGTERM);
            }
        });
        StopRequest { asked, listening }
    }

    fn requested(&self) -> bool {
        *self.asked.borrow()
    }

    /// The server listens: a stop is the drain's from now on.
    fn listening(&self) {
        self.listening
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    async fn wait(mut self) {
        let _ = self.asked.wait_for(|asked| *asked).await;
    }
}

/// Ends a start-up a shutdown signal interrupted between steps: `server_stop` says so, and the
/// last checkpoint attests it (the workers already started end with the supervisor's handles).
fn stopped_during_start_up(
    runtime: &tokio::runtime::Runtime,
    audit: &crate::audit::AuditLog,
) -> CmdResult {
    tracing::info!("stop signal during start-up: stopping");
    runtime.block_on(
        audit.append(
            crate::audit::AuditRecord::event("server_stop")
                .with_detail("stopped by a signal during start-up"),
        ),
    )?;
    let log = audit.clone();
    runtime
        .block_on(async { tokio::task::spawn_blocking(move || log.checkpoint_now()).await })??;
    Ok(())
}

impl ServeArgs {
    /// The settings: the config file (if any), then the flags over it, validated. Run at start
    /// and again on SIGHUP (the file may have changed; the flags have not).
    fn settings(&self) -> Result<ServeConfig, String> {
        let mut config = match &self.config {
            Some(path) => ServeConfig::from_file(path)?,
            None => ServeConfig::default(),
        };
        if let Some(l) = self.listen {
            config.listen = l;
        }
        if self.tls_cert.is_some() || self.tls_key.is_some() {
            config.tls_cert = self.tls_cert.clone();
            config.tls_key = self.tls_key.clone();
        }
        if self.client_ca.is_some() {
            config.client_ca = self.client_ca.clone();
        }
        if self.model_name.is_some() {
            config.model_name = self.model_name.clone();
        }
        config.insecure_public_http |= self.insecure_public_http;
        if let Some(c) = self.audit_content {
            config.audit_content = c;
        }
        // A value error names the file too (the key is in the message).
        config.validate().map_err(|e| match &self.config {
            Some(path) => format!("{}: {e}", path.display()),
            None => e,
        })?;
        Ok(config)
    }

    /// The models to serve: MODEL (named by --model-name, or its file name), then every
    /// --model, then the config's `[[models]]`; names must differ.
    fn model_specs(&self, config: &ServeConfig) -> Result<Vec<ModelSpec>, String> {
        let path = &self.common.model.model;
        let first = ModelSpec {
            name: config
                .model_name
                .clone()
                .unwrap_or_else(|| default_name(path)),
            path: path.clone(),
            signature: self.common.signature.clone(),
        };
        let specs: Vec<ModelSpec> = std::iter::once(first)
            .chain(self.models.iter().cloned())
            .chain(config.models.iter().cloned())
            .collect();
        let mut names = std::collections::BTreeSet::new();
        for spec in &specs {
            spec.check_name()?;
            if !names.insert(spec.name.as_str()) {
                return Err(format!(
                    "two models are named {:?}: give each its own name",
                    spec.name
                ));
            }
        }
        Ok(specs)
    }

    pub(super) fn threads(&self) -> Option<u16> {
        self.common.threads
    }
}
