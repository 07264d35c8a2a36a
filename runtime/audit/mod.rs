//! The local, encrypted, tamper-evident audit log.
//!
//! Every user request (refused ones included) and every operator action becomes one record:
//! serialized to JSON, sealed with XChaCha20-Poly1305 under the current epoch's key, bound into
//! a hash chain ([`segment`]), and written to an append-only segment file. A request is answered
//! only after its record is durable (group commit: one `fdatasync` per batch); if the log
//! cannot be written, the server refuses work (fail closed). Keys evolve forward per epoch
//! ([`keys`]); [`verify`] checks everything with the epoch-0 key kept off the host.

pub mod checkpoint;
pub mod keys;
pub mod retention;
pub mod segment;
pub mod spool;
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
    /// How many requests this record stands for (`refused_summary`: refusals counted rather
    /// than recorded one by one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
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
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    pub durability: Durability,
    /// Start a new epoch once the current one is this old (and on every start, and at 64 MiB).
    pub rotate_after: std::time::Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            durability: Durability::Fsync,
            rotate_after: DEFAULT_ROTATE_AFTER,
        }
    }
}
/// How far the newest segment may be ahead of the host's key (empty segments left by crashes
/// between creating a segment and storing its key).
const MAX_EPOCHS_AHEAD: u32 = 1000;
/// Records per group commit at most.
const BATCH: usize = 512;

/// What the writer thread is asked to do.
enum Pending {
    Record {
        record: Box<AuditRecord>,
        done: std_mpsc::SyncSender<Result<(), AuditError>>,
    },
    /// Sign a checkpoint now (if anything is unattested), e.g. before the process exits.
    Checkpoint(std_mpsc::SyncSender<Result<(), AuditError>>),
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
    checkpoint::write_root(dir, &k0)?;
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
    dir: PathBuf,
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
    options: WriterOptions,
    /// When the current epoch began.
    epoch_started: Instant,
    /// Records written since the last checkpoint, and when that was.
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

impl AuditLog {
    /// Opens the log for appending: starts a new epoch (ratcheting the key, erasing the old
    /// one) in a new segment, after the chain found on disk. A torn tail in the previous
    /// segment is reported in the first record of the new one.
    pub fn open(dir: &Path, durability: Durability) -> Result<AuditLog, AuditError> {
        Self::open_with(
            dir,
            WriterOptions {
                durability,
                ..Default::default()
            },
        )
    }

    /// [`Self::open`] with every writer option. Events that CLI commands spooled while this
    /// directory's writer was busy are recorded first.
    pub fn open_with(dir: &Path, options: WriterOptions) -> Result<AuditLog, AuditError> {
        init(dir)?;
        let lock_path = dir.join("writer.lock");
        let lock = crate::trust::open_lock_file(&lock_path)
            .map_err(|e| AuditError::Io(format!("{}: {e}", lock_path.display())))?;
        lock.try_lock()
            .map_err(|_| AuditError::Busy(dir.display().to_string()))?;
        let old = EpochKey::load(&dir.join(keys::CURRENT_KEY))?;
        let segments = segment::list_segments(dir).map_err(|e| AuditError::Io(e.to_string()))?;
        let torn_checkpoint = checkpoint::cut_torn_tail(dir)?;
        // The chain resumes from the oldest segment kept (after retention, from its handover).
        let first_epoch = segments.first().map_or(1, |(e, _)| *e);
        let (mut seq, mut head) = checkpoint::start_of(&[], first_epoch)
            .or_else(|| {
                let list = checkpoint::read(dir).ok()?.list;
                checkpoint::start_of(&list, first_epoch)
            })
            .ok_or_else(|| {
                AuditError::Io(format!(
                    "{}: no checkpoint says where epoch {first_epoch} began; run securerun audit verify",
                    dir.display()
                ))
            })?;
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
        // A segment far ahead of the host's key was not made by this writer (a crash leaves at
        // most one empty segment per start): refuse it rather than ratchet up to its number.
        if last_epoch > old.epoch.saturating_add(MAX_EPOCHS_AHEAD) {
            return Err(AuditError::Io(format!(
                "{}: segment epoch {last_epoch} is far ahead of the key's epoch {}; run securerun audit verify",
                dir.display(),
                old.epoch
            )));
        }
        let key = old
            .epoch
            .max(last_epoch)
            .checked_add(1)
            .and_then(|e| old.advance_to(e))
            .ok_or_else(|| AuditError::Key("epoch counter exhausted".into()))?;
        let file = begin_epoch(dir, &old, &key, seq, &head)?;
        drop(old);
        let now = Instant::now();
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            key,
            file,
            len: 0,
            seq,
            head,
            options,
            epoch_started: now,
            since_checkpoint: 0,
            last_checkpoint: now,
        };
        let mut first = AuditRecord::event("audit_epoch_start")
            .with_detail(format!("epoch {}, after record {seq}", writer.key.epoch));
        if let Some(t) = torn {
            first.outcome = Some("torn_tail_found".into());
            first.detail = Some(t);
        }
        if let Some(t) = torn_checkpoint {
            let detail = first.detail.take().unwrap_or_default();
            first.detail = Some(format!("{detail}; {t}"));
        }
        let mut startup = vec![first];
        let spooled = spool::take(dir)?;
        startup.extend(spooled.records.iter().cloned());
        writer.append(&startup)?;
        spool::remove(&spooled);
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
            dir: dir.to_path_buf(),
            write_us: Arc::default(),
            writes: Arc::default(),
        })
    }

    /// Appends a record and waits until it is durable.
    pub fn append_blocking(&self, record: AuditRecord) -> Result<(), AuditError> {
        let started = Instant::now();
        let (done, wait) = std_mpsc::sync_channel(1);
        self.tx
            .send(Pending::Record {
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
            .send(Pending::Record {
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
            .send(Pending::Checkpoint(done))
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        wait.recv()
            .unwrap_or_else(|_| Err(AuditError::Unavailable("the audit writer stopped".into())))
    }

    /// Checkpoints and lets the writer go (a CLI command's log, before the process exits).
    pub fn close(self) -> Result<(), AuditError> {
        self.checkpoint_now()
    }

    /// Records the operator actions CLI commands spooled while this log was being written
    /// (see [`spool`]), then removes their files.
    pub fn ingest_spool(&self) -> Result<usize, AuditError> {
        let spooled = spool::take(&self.dir)?;
        for r in &spooled.records {
            self.append_blocking(r.clone())?;
        }
        spool::remove(&spooled);
        Ok(spooled.records.len())
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
        loop {
            let first = match rx.recv_timeout(checkpoint::EVERY) {
                Ok(Pending::Checkpoint(done)) => {
                    let r = if self.since_checkpoint > 0 {
                        self.checkpoint()
                    } else {
                        Ok(())
                    };
                    let _ = done.send(r);
                    continue;
                }
                Ok(Pending::Record { record, done }) => (*record, done),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    self.checkpoint_if_due(&last_error);
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let (mut records, mut waiting) = (vec![first.0], vec![first.1]);
            // A checkpoint request met while batching runs after the batch.
            let mut checkpoint_wanted = None;
            while records.len() < BATCH && checkpoint_wanted.is_none() {
                match rx.try_recv() {
                    Ok(Pending::Record { record, done }) => {
                        records.push(*record);
                        waiting.push(done);
                    }
                    Ok(Pending::Checkpoint(done)) => checkpoint_wanted = Some(done),
                    Err(_) => break,
                }
            }
            let result = self.append(&records);
            healthy.store(result.is_ok(), Ordering::Relaxed);
            if let Ok(mut e) = last_error.lock() {
                *e = result.as_ref().err().map(|e| e.to_string());
            }
            if let Err(e) = &result {
                tracing::error!(error = %e, "audit write failed; requests are refused until it succeeds");
            }
            for done in waiting {
                let _ = done.send(
                    result
                        .clone()
                        .map_err(|e| AuditError::Unavailable(e.to_string())),
                );
            }
            if let Some(done) = checkpoint_wanted {
                let _ = done.send(result.clone().and_then(|_| self.checkpoint()));
            } else if result.is_ok() {
                self.checkpoint_if_due(&last_error);
            }
        }
        // All senders gone: the server is shutting down; the last batch is already synced.
        // A final checkpoint attests how far the log went.
        if self.since_checkpoint > 0 {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "final audit checkpoint failed");
            }
        }
    }

    /// Signs a checkpoint if enough records or time have passed since the last one. A failed
    /// checkpoint is reported and retried later; the records themselves are already durable.
    fn checkpoint_if_due(&mut self, last_error: &Mutex<Option<String>>) {
        let due = self.since_checkpoint >= checkpoint::EVERY_RECORDS
            || (self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= checkpoint::EVERY);
        if !due {
            return;
        }
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "audit checkpoint failed; retrying after the next write");
            if let Ok(mut le) = last_error.lock() {
                *le = Some(e.to_string());
            }
        }
    }

    fn checkpoint(&mut self) -> Result<(), AuditError> {
        let c = checkpoint::Checkpoint::sign(&self.key, self.seq, &self.head, None)?;
        checkpoint::append(&self.dir, &c, true)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Seals and writes `records`, then syncs. On failure the file is cut back to its last good
    /// length, so a failed batch leaves no partial frame behind.
    fn append(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
        if self.len > ROTATE_BYTES || self.epoch_started.elapsed() >= self.options.rotate_after {
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
            .and_then(|_| match self.options.durability {
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
        self.since_checkpoint += records.len() as u64;
        Ok(())
    }

    /// Ends the current epoch: the next epoch's segment, handover checkpoint and key; the
    /// current key is then forgotten. The new epoch's first record says why it began.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let next = self.key.next();
        let file = begin_epoch(&self.dir, &self.key, &next, self.seq, &self.head)?;
        self.key = next;
        self.file = file;
        self.len = 0;
        self.epoch_started = Instant::now();
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        let first = AuditRecord::event("audit_epoch_start").with_detail(format!(
            "epoch {}, after record {} (rotation)",
            self.key.epoch, self.seq
        ));
        self.append(std::slice::from_ref(&first))
    }
}

/// Starts epoch `next` after `(seq, head)`: appends the handover checkpoint signed by `old`
/// (naming `next`'s checkpoint key), creates the new segment, then replaces the host's key.
/// Each step is durable before the next, so a crash leaves the old key with at most a handover
/// and an empty segment, which the next start skips past (every segment keeps its handover).
fn begin_epoch(
    dir: &Path,
    old: &EpochKey,
    next: &EpochKey,
    seq: u64,
    head: &[u8; 32],
) -> Result<File, AuditError> {
    let handover = checkpoint::Checkpoint::sign(old, seq, head, Some(next))?;
    checkpoint::append(dir, &handover, true)?;
    let path = dir.join(segment::segment_name(next.epoch));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
    // Only now forget the old key: the new segment and the handover exist for the new one.
    next.store(&dir.join(keys::CURRENT_KEY))?;
    Ok(file)
}
