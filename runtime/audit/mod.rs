//! The local, encrypted, tamper-evident audit log.
//!
//! Every user request (refused ones included) and every operator action becomes one record:
//! serialized to JSON, sealed with XChaCha20-Poly1305 under the current epoch's key, bound into
//! a hash chain ([`segment`]), and written to an append-only segment file. A request is answered
//! only after its record is durable (group commit: one `fdatasync` per batch); if the log
//! cannot be written, the server refuses work (fail closed). Keys evolve forward per epoch
//! ([`keys`]); [`verify`] checks everything with the epoch-0 key kept off the host.

pub mod keys;
pub mod segment;
pub mod verify;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use keys::EpochKey;

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
/// Records per group commit at most.
const BATCH: usize = 512;

struct Pending {
    record: AuditRecord,
    done: std_mpsc::SyncSender<Result<(), AuditError>>,
}

/// Where the log and its keys live.
pub fn audit_dir(state: &Path) -> PathBuf {
    state.join("audit")
}

/// Creates the audit directory and the epoch-0 key if absent; returns whether it was created
/// now (the caller tells the operator to move `read.key` off the host).
pub fn init(dir: &Path) -> Result<bool, AuditError> {
    crate::trust::create_private_dir(dir)
        .map_err(|e| AuditError::Io(format!("{}: {e}", dir.display())))?;
    let current = dir.join(keys::CURRENT_KEY);
    if current.exists() {
        return Ok(false);
    }
    let k0 = EpochKey::random();
    k0.store(&dir.join(keys::READ_KEY))?;
    k0.store(&current)?;
    keys::pseudonym_key(dir)?;
    Ok(true)
}

/// The writer: a thread that seals, appends and syncs records in batches.
#[derive(Clone)]
pub struct AuditLog {
    /// Held for the writer's lifetime: one writer per audit directory.
    _lock: Arc<File>,
    tx: std_mpsc::Sender<Pending>,
    healthy: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
    pseudonym_key: [u8; 32],
    /// Total microseconds spent waiting for durable writes, and count (for /metrics).
    pub write_us: Arc<AtomicU64>,
    pub writes: Arc<AtomicU64>,
}

struct Writer {
    dir: PathBuf,
    key: EpochKey,
    file: File,
    len: u64,
    seq: u64,
    head: [u8; 32],
    durability: Durability,
}

impl AuditLog {
    /// Opens the log for appending: starts a new epoch (ratcheting the key, erasing the old
    /// one) in a new segment, after the chain found on disk. A torn tail in the previous
    /// segment is reported in the first record of the new one.
    pub fn open(dir: &Path, durability: Durability) -> Result<AuditLog, AuditError> {
        init(dir)?;
        let lock_path = dir.join("writer.lock");
        let lock = crate::trust::open_lock_file(&lock_path)
            .map_err(|e| AuditError::Io(format!("{}: {e}", lock_path.display())))?;
        lock.try_lock().map_err(|_| {
            AuditError::Io(format!(
                "{}: another securerun process is writing this audit log",
                dir.display()
            ))
        })?;
        let old = EpochKey::load(&dir.join(keys::CURRENT_KEY))?;
        let segments = segment::list_segments(dir).map_err(|e| AuditError::Io(e.to_string()))?;
        let mut seq = 0;
        let mut head = [0u8; 32];
        let mut torn = None;
        for (epoch, path) in &segments {
            let contents = segment::read(path)
                .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
            for f in &contents.frames {
                head = segment::chain(&head, &f.body);
                seq = f.seq;
            }
            if let Some(at) = contents.torn_at {
                torn = Some(format!("segment {epoch} ends in an incomplete record at byte {at} (after record {seq})"));
            }
        }
        let last_epoch = segments.last().map_or(0, |(e, _)| *e);
        let key = old
            .advance_to(old.epoch.max(last_epoch) + 1)
            .expect("forward");
        let path = dir.join(segment::segment_name(key.epoch));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
        // Only now forget the old key: the new segment exists for the new one.
        key.store(&dir.join(keys::CURRENT_KEY))?;
        drop(old);
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            key,
            file,
            len: 0,
            seq,
            head,
            durability,
        };
        let mut first = AuditRecord::event("audit_epoch_start")
            .with_detail(format!("epoch {}, after record {seq}", writer.key.epoch));
        if let Some(t) = torn {
            first.outcome = Some("torn_tail_found".into());
            first.detail = Some(t);
        }
        writer.append(std::slice::from_ref(&first))?;
        let pseudonym_key = keys::pseudonym_key(dir)?;
        let (tx, rx) = std_mpsc::channel::<Pending>();
        let healthy = Arc::new(AtomicBool::new(true));
        let last_error = Arc::new(Mutex::new(None));
        let (h, le) = (healthy.clone(), last_error.clone());
        std::thread::Builder::new()
            .name("securerun-audit".into())
            .spawn(move || writer.run(rx, h, le))
            .map_err(|e| AuditError::Io(e.to_string()))?;
        Ok(AuditLog {
            _lock: Arc::new(lock),
            tx,
            healthy,
            last_error,
            pseudonym_key,
            write_us: Arc::default(),
            writes: Arc::default(),
        })
    }

    /// Appends a record and waits until it is durable.
    pub fn append_blocking(&self, record: AuditRecord) -> Result<(), AuditError> {
        let started = Instant::now();
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(Pending { record, done })
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        let r = wait
            .recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("the audit writer stopped".into())));
        self.write_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.writes.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Async form of [`Self::append_blocking`] (the wait runs on a blocking thread).
    pub async fn append(&self, record: AuditRecord) -> Result<(), AuditError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append_blocking(record))
            .await
            .unwrap_or_else(|_| Err(AuditError::Unavailable("audit task failed".into())))
    }

    /// Whether the last write succeeded.
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

impl Writer {
    fn run(
        mut self,
        rx: std_mpsc::Receiver<Pending>,
        healthy: Arc<AtomicBool>,
        last_error: Arc<Mutex<Option<String>>>,
    ) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let records: Vec<AuditRecord> = batch.iter().map(|p| p.record.clone()).collect();
            let result = self.append(&records);
            healthy.store(result.is_ok(), Ordering::Relaxed);
            if let Ok(mut e) = last_error.lock() {
                *e = result.as_ref().err().map(|e| e.to_string());
            }
            if let Err(e) = &result {
                tracing::error!(error = %e, "audit write failed; requests are refused until it succeeds");
            }
            for p in batch {
                let _ = p.done.send(
                    result
                        .clone()
                        .map_err(|e| AuditError::Unavailable(e.to_string())),
                );
            }
        }
        // All senders gone: the server is shutting down; the last batch is already synced.
    }

    /// Seals and writes `records`, then syncs. On failure the file is cut back to its last good
    /// length, so a failed batch leaves no partial frame behind.
    fn append(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
        if self.len > ROTATE_BYTES {
            self.rotate()?;
        }
        let record_key = self.key.record_key();
        let (mut seq, mut head) = (self.seq, self.head);
        let mut bytes = Vec::new();
        for r in records {
            seq += 1;
            let json = serde_json::to_vec(r).map_err(|e| AuditError::Io(e.to_string()))?;
            let (frame, next) = segment::seal(&record_key, seq, self.key.epoch, &head, &json);
            bytes.extend_from_slice(&frame);
            head = next;
        }
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|_| match self.durability {
                Durability::Fsync => self.file.sync_data(),
                Durability::Buffered => Ok(()),
            });
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            return Err(AuditError::Io(e.to_string()));
        }
        self.len += bytes.len() as u64;
        self.seq = seq;
        self.head = head;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        let next = self.key.next();
        let path = self.dir.join(segment::segment_name(next.epoch));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
        next.store(&self.dir.join(keys::CURRENT_KEY))?;
        self.key = next;
        self.file = file;
        self.len = 0;
        Ok(())
    }
}
