//! The local, encrypted, tamper-evident audit log.
//!
//! Every user request (refused ones included) and every operator action becomes one record:
//! serialized to JSON, sealed with XChaCha20-Poly1305 under the current epoch's record key,
//! bound into a hash chain ([`segment`]), and written to an append-only segment file. A request
//! is answered only after its record is durable (group commit: one `fdatasync` per batch); if
//! the log cannot be written, the server refuses work (fail closed) until it can, and the next
//! record says what happened ([`writer`]).
//!
//! Integrity and confidentiality are separate. Each epoch has two fresh random secrets
//! ([`keys`]): a record key, delivered to the auditor encrypted to the auditor's public key
//! ([`recipient`]), and a checkpoint signing key, whose public half the previous epoch's final
//! checkpoint names ([`checkpoint`]). An auditor verifies with `audit.pub` alone and reads with
//! the read key; the read key signs nothing. The newest signed heads also go off the host
//! ([`sink`]) so that cutting the end of the log is detected ([`verify`]).

pub mod checkpoint;
pub mod keys;
pub mod recipient;
pub mod retention;
pub mod secret;
pub mod segment;
pub mod sink;
pub mod spool;
pub mod stream;
pub mod v1;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use recipient::{ReadKey, Recipient};
pub use sink::SinkSpec;

/// One audited event. Never holds a token secret or, unless `content` is enabled, any prompt
/// or completion text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// Keyed HMAC of the client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Keyed HMAC of the end user the caller named (OpenAI's `user` field): who, on whose
    /// behalf, without their identifier in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// `--audit-content hmac`: keyed HMACs of the texts sent (one per message or input), so an
    /// investigator can test whether a known text was sent without the log holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hmac: Option<Vec<String>>,
    /// `--audit-content full`: the texts sent and the completion (encrypted like every record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<serde_json::Value>,
    /// Free-form detail for operator events (never secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How many requests this record stands for (`refused_summary`: refusals counted rather
    /// than recorded one by one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Taken from the spool: a CLI command did this while a server held the log, and the
    /// server recorded it later (its time is bounded by the spool file's age).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spooled: Option<bool>,
    /// `audit_shredded`: the first epoch kept (every earlier one was shredded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
}

impl AuditRecord {
    pub fn event(event: &str) -> Self {
        AuditRecord {
            time_ms: now_ms(),
            event: event.to_string(),
            ..Default::default()
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log I/O: {0}")]
    Io(String),
    #[error("audit key: {0}")]
    Key(String),
    #[error("the audit log is not writable ({0}); refusing unaudited work")]
    Unavailable(String),
    #[error("{0}: another securerun process is writing this audit log")]
    Busy(String),
    /// The files on disk are not what this host's writer left: it will not attest over them.
    #[error("the audit log cannot be continued: {0}; run securerun audit verify")]
    Untrusted(String),
}

/// How records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` after each batch before anyone is answered (default).
    Fsync,
    /// Written to the OS only (survives a process crash, not a power loss).
    Buffered,
}

/// Segment size at which a new epoch and segment begin.
const ROTATE_BYTES: u64 = 64 * 1024 * 1024;
/// Default age at which a new epoch and segment begin: retention (crypto-shredding) works in
/// whole epochs, so epochs must not grow without bound in time either.
pub const DEFAULT_ROTATE_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub durability: Durability,
    /// Start a new epoch once the current one is this old (and on every start, and at 64 MiB).
    pub rotate_after: std::time::Duration,
    /// Where each signed checkpoint is also sent.
    pub sinks: Vec<SinkSpec>,
    /// Where each record is also sent once written (`--audit-stream`).
    pub streams: Vec<stream::StreamSpec>,
    /// For a log created now: the auditor's public key. Without one (and without a
    /// `recipient.pub` already in the directory) a read key is generated on the host, and
    /// `serve` warns at every start until it is moved off.
    pub recipient: Option<Recipient>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            durability: Durability::Fsync,
            rotate_after: DEFAULT_ROTATE_AFTER,
            sinks: Vec::new(),
            streams: Vec::new(),
            recipient: None,
        }
    }
}

/// Where the log and its keys live.
pub fn audit_dir(state: &Path) -> PathBuf {
    state.join("audit")
}

/// How [`init`] found the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A log was already there.
    Existing,
    /// Created now, with the read key on this host (to be moved off).
    WithHostReadKey,
    /// Created now for an auditor's recipient key: no read key on this host.
    ForRecipient,
}

/// Creates the audit log if the directory holds none: see [`writer::init`].
pub fn init(dir: &Path, recipient: Option<Recipient>) -> Result<Created, AuditError> {
    writer::init(dir, recipient)
}

/// Whether a log has been created in `dir` (its epoch keys exist).
pub fn exists(dir: &Path) -> bool {
    let has = |name: &str| securerun_models::fsutil::exists_no_follow(&dir.join(name));
    has(keys::CURRENT_KEY) || has(keys::NEXT_KEY)
}

/// Audit fault and sink counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Times the log became unwritable (each fault once, however long it lasted).
    pub faults: AtomicU64,
    /// Records that could not be written (their requests were refused).
    pub records_refused: AtomicU64,
    /// Datagram checkpoint sends that failed.
    pub sink_errors: Arc<AtomicU64>,
    /// Records a stream could not take or send (see [`stream`]).
    pub stream_dropped: Arc<AtomicU64>,
    /// Live files found deleted or replaced (and restored from the open descriptor).
    pub files_restored: AtomicU64,
}

/// The writer: a thread that seals, appends and syncs records in batches.
#[derive(Clone)]
pub struct AuditLog {
    tx: std_mpsc::Sender<writer::Pending>,
    healthy: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
    pseudonym_key: Arc<secret::Secret>,
    dir: PathBuf,
    pub counters: Arc<Counters>,
    /// Total microseconds spent waiting for durable writes, and count (for /metrics).
    pub write_us: Arc<AtomicU64>,
    pub writes: Arc<AtomicU64>,
}

impl AuditLog {
    /// Opens the log for appending (see [`Self::open_with`]).
    pub fn open(dir: &Path, durability: Durability) -> Result<AuditLog, AuditError> {
        Self::open_with(
            dir,
            WriterOptions {
                durability,
                ..Default::default()
            },
        )
    }

    /// Opens the log for appending: creates it if the directory holds none, authenticates the
    /// newest epoch with the key this host holds (refusing to go on over anything it cannot
    /// authenticate), closes that epoch with a signed final checkpoint and begins a new one.
    /// Events that CLI commands spooled while this directory's writer was busy are recorded
    /// first.
    pub fn open_with(dir: &Path, options: WriterOptions) -> Result<AuditLog, AuditError> {
        init(dir, options.recipient)?;
        let lock_path = dir.join("writer.lock");
        let lock = crate::trust::open_lock_file(&lock_path)
            .map_err(|e| AuditError::Io(format!("{}: {e}", lock_path.display())))?;
        if !lock
            .metadata()
            .map_err(|e| AuditError::Io(e.to_string()))?
            .is_file()
        {
            return Err(AuditError::Io(format!(
                "{}: not a regular file",
                lock_path.display()
            )));
        }
        lock.try_lock()
            .map_err(|_| AuditError::Busy(dir.display().to_string()))?;
        let sinks = sink::Sinks::new(options.sinks.clone());
        let streams = stream::Streams::start(options.streams.clone());
        let counters = Arc::new(Counters {
            sink_errors: sinks.errors.clone(),
            stream_dropped: streams.dropped.clone(),
            ..Default::default()
        });
        let mut w = writer::Writer::open(dir, options, sinks, counters.clone(), lock)?;
        w.streams = streams;
        let spooled = spool::take(dir)?;
        let mut startup = vec![w.epoch_start_record()];
        startup.extend(spooled.records.iter().cloned());
        w.append(&startup)?;
        for r in &spooled.records {
            if let (true, Some(from)) = (r.event == retention::SHREDDED, r.epoch) {
                w.retain(from)?;
            }
        }
        spool::remove(&spooled);
        let pseudonym_key = Arc::new(keys::pseudonym_key(dir)?);
        let (tx, rx) = std_mpsc::channel::<writer::Pending>();
        let healthy = Arc::new(AtomicBool::new(true));
        let last_error = Arc::new(Mutex::new(None));
        let (h, le) = (healthy.clone(), last_error.clone());
        std::thread::Builder::new()
            .name("securerun-audit".into())
            .spawn(move || {
                if let Some(closer) = w.run(rx, h, le) {
                    // `w` (and with it the lock) is gone by now.
                    let _ = closer.send(Ok(()));
                }
            })
            .map_err(|e| AuditError::Io(e.to_string()))?;
        Ok(AuditLog {
            tx,
            healthy,
            last_error,
            pseudonym_key,
            dir: dir.to_path_buf(),
            counters,
            write_us: Arc::default(),
            writes: Arc::default(),
        })
    }

    /// Appends a record and waits until it is durable.
    pub fn append_blocking(&self, record: AuditRecord) -> Result<(), AuditError> {
        let started = Instant::now();
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(writer::Pending::Record {
                record: Box::new(record),
                done,
            })
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        let r = wait
            .recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("the audit writer stopped".into())));
        self.write_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.writes.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Hands a record to the writer without waiting for it to be durable: for destructors
    /// (a request whose client vanished), where nothing can wait. Records are written in the
    /// order they are handed over, so a later durable append or checkpoint covers it.
    pub fn submit(&self, record: AuditRecord) {
        let (done, _ignored) = std_mpsc::sync_channel(1);
        if self
            .tx
            .send(writer::Pending::Record {
                record: Box::new(record),
                done,
            })
            .is_ok()
        {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Async form of [`Self::append_blocking`] (the wait runs on a blocking thread).
    pub async fn append(&self, record: AuditRecord) -> Result<(), AuditError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append_blocking(record))
            .await
            .unwrap_or_else(|_| Err(AuditError::Unavailable("audit task failed".into())))
    }

    /// Signs a checkpoint of everything written so far and waits until it is durable.
    pub fn checkpoint_now(&self) -> Result<(), AuditError> {
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(writer::Pending::Checkpoint(done))
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        wait.recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("the audit writer stopped".into())))
    }

    /// Signs a checkpoint stating that epochs before `from` may be shredded (after everything
    /// submitted so far), and waits until it is durable. Retention deletes nothing before this.
    pub fn retain(&self, from: u32) -> Result<(), AuditError> {
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(writer::Pending::Retain(from, done))
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        wait.recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("the audit writer stopped".into())))
    }

    /// Checkpoints, stops the writer and waits until it has let the log's lock go (a CLI
    /// command's log: the next command, or a server starting, finds the log free).
    pub fn close(self) -> Result<(), AuditError> {
        self.checkpoint_now()?;
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(writer::Pending::Close(done))
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        wait.recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("the audit writer stopped".into())))
    }

    /// Records the operator actions CLI commands spooled while this log was being written
    /// (see [`spool`]), then removes their files.
    pub fn ingest_spool(&self) -> Result<usize, AuditError> {
        let spooled = spool::take(&self.dir)?;
        for r in &spooled.records {
            self.append_blocking(r.clone())?;
            // A shredding the CLI recorded while this server holds the log: the signed
            // statement it waits for before deleting anything.
            if let (true, Some(from)) = (r.event == retention::SHREDDED, r.epoch) {
                self.retain(from)?;
            }
        }
        spool::remove(&spooled);
        Ok(spooled.records.len())
    }

    /// Whether the log is writable (the last write, checkpoint and file check succeeded).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn pseudonym(&self, value: &str) -> String {
        keys::pseudonym(&self.pseudonym_key, value)
    }
}
