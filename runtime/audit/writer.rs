//! The writer: creating a log, authenticating before attesting, epochs, faults, live files.
//!
//! **Start.** The writer trusts nothing on disk it cannot authenticate with what it holds: it
//! walks the signed checkpoints from `audit.pub`, checks that `current.key` is the key the
//! newest handover named (public key and record-key commitment), refuses unknown or planted
//! per-epoch files (any file of a later epoch, any name not in the writer's exact form), and
//! authenticates every frame of the newest segment against the chain and its checkpoints. Only
//! then does it sign that epoch's final checkpoint and begin a new one. A torn tail (a crash
//! in the middle of a write) at the end of the newest segment is cut and reported in the new
//! epoch's first record; anywhere else it is refused.
//!
//! **Epochs.** [`begin_epoch`] hands over in steps that are each durable before the next, so a
//! crash at any point leaves either the old epoch intact or a complete handover:
//! new secrets → `key-E.wrap` → `next.key` → final checkpoint in `cp-(E-1)` → new segment and
//! checkpoint file → `current.key` overwritten in place with zeros, then `next.key` renamed over
//! it. A start that finds `next.key` completes the handover if its final checkpoint is on disk
//! and discards it otherwise.
//!
//! **Faults.** A failed write, sync, checkpoint or file-sink write makes the log unhealthy:
//! records are refused (the server answers 503), the fault is counted, and the writer retries
//! every second. The first record after recovery says what failed, since when, for how long,
//! and how many records were refused. Every second the writer also checks that its live
//! segment and checkpoint file are still the files it writes (not deleted, not replaced); one
//! that is gone is restored from the open descriptor (a replacement is kept aside as
//! `replaced-TIME-NAME`) and recorded as a fault.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::checkpoint::{self, Checkpoint};
use super::keys::{self, EpochSecrets};
use super::recipient::{self, ReadKey, Recipient};
use super::segment::{self, Kind, Listing};
use super::sink::Sinks;
use super::{AuditError, AuditRecord, Counters, Created, Durability, WriterOptions, ROTATE_BYTES};

/// Records per group commit at most.
const BATCH: usize = 512;
/// How often the live files are checked and a failed log is retried.
const TICK: Duration = Duration::from_secs(1);

/// What the writer thread is asked to do.
pub(super) enum Pending {
    Record {
        record: Box<AuditRecord>,
        done: std_mpsc::SyncSender<Result<(), AuditError>>,
    },
    /// Sign a checkpoint now (if anything is unattested), e.g. before the process exits.
    Checkpoint(std_mpsc::SyncSender<Result<(), AuditError>>),
    /// Sign a checkpoint stating that epochs before this one may be shredded.
    Retain(u32, std_mpsc::SyncSender<Result<(), AuditError>>),
    /// Checkpoint, stop, and let the lock go; answered once the lock is released.
    Close(std_mpsc::SyncSender<Result<(), AuditError>>),
}

/// Creates the log if `dir` holds none (see the module docs for what "none" means): the
/// recipient (given, already in the directory, or a read key generated here), the root key,
/// which signs the genesis handover to epoch 1 and is dropped, and epoch 1's files and key.
///
/// A directory whose `current.key` is missing while a segment holds records is never
/// re-initialized: that would put a new root over evidence.
pub fn init(dir: &Path, recipient: Option<Recipient>) -> Result<Created, AuditError> {
    crate::trust::create_private_dir(dir)
        .map_err(|e| AuditError::Io(format!("{}: {e}", dir.display())))?;
    let io = |e: std::io::Error| AuditError::Io(format!("{}: {e}", dir.display()));
    let has = |name: &str| securerun_models::fsutil::exists_no_follow(&dir.join(name));
    if has(keys::CURRENT_KEY) || has(keys::NEXT_KEY) {
        return Ok(Created::Existing);
    }
    let listing = Listing::of(dir).map_err(io)?;
    let evidence = listing.files.iter().any(|((e, kind), path)| {
        let len = std::fs::symlink_metadata(path).map_or(1, |m| m.len());
        len > 0 && !(*e == 0 && *kind == Kind::Checkpoints) && *kind != Kind::Wrap
    });
    if evidence || !listing.unknown.is_empty() || super::v1::is_v1(dir) {
        return Err(AuditError::Untrusted(format!(
            "{}: the log's current.key is missing but the log holds records; a new log is not started over them (move the directory aside for the auditor, or run securerun audit migrate for a log of the old format)",
            dir.display()
        )));
    }
    // Nothing but an interrupted creation: start over.
    for path in listing.files.values() {
        std::fs::remove_file(path).map_err(io)?;
    }
    let (created, recipient) = match recipient {
        Some(r) => (Created::ForRecipient, r),
        None if has(recipient::RECIPIENT) => (
            Created::ForRecipient,
            Recipient::load(&dir.join(recipient::RECIPIENT))?,
        ),
        None => {
            let read = ReadKey::generate();
            read.store(&dir.join(recipient::READ_KEY))?;
            (Created::WithHostReadKey, read.recipient())
        }
    };
    let path = dir.join(recipient::RECIPIENT);
    crate::state_dir::write_public(&path, recipient.encode().as_bytes())
        .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
    let root = EpochSecrets::generate(0);
    checkpoint::write_root(dir, &root.public_key())?;
    let first = EpochSecrets::generate(1);
    write_wrap(dir, &recipient, &first)?;
    let genesis = Checkpoint::sign(&root, 0, &[0; 32], &first)?;
    drop(root);
    checkpoint::append(&mut checkpoint::open_for_append(dir, 0, true)?, &genesis)?;
    create_epoch_files(dir, 1)?;
    first.store(&dir.join(keys::CURRENT_KEY))?;
    keys::pseudonym_key(dir)?;
    Ok(created)
}

fn write_wrap(dir: &Path, to: &Recipient, secrets: &EpochSecrets) -> Result<(), AuditError> {
    to.wrap(secrets.epoch, secrets.record_key())
        .store(&dir.join(recipient::wrap_name(secrets.epoch)))
}

/// Creates (or, after a crash, reopens if still empty) an epoch's segment and checkpoint file.
fn create_epoch_files(dir: &Path, epoch: u32) -> Result<(File, File), AuditError> {
    let path = dir.join(segment::segment_name(epoch));
    // Readable too: a live file deleted while the writer runs is restored from this descriptor.
    let seg = match std::fs::OpenOptions::new()
        .append(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let f = open_append(&path)?;
            if f.metadata()
                .map_err(|e| AuditError::Io(e.to_string()))?
                .len()
                != 0
            {
                return Err(AuditError::Untrusted(format!(
                    "{}: a segment for an epoch that has not begun holds data (planted)",
                    path.display()
                )));
            }
            f
        }
        Err(e) => return Err(AuditError::Io(format!("{}: {e}", path.display()))),
    };
    let cp = checkpoint::open_for_append(dir, epoch, true)?;
    keys::sync_dir(&path);
    Ok((seg, cp))
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
    if !f
        .metadata()
        .map_err(|e| AuditError::Io(e.to_string()))?
        .is_file()
    {
        return Err(AuditError::Untrusted(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

/// Hands epoch `old` over to a new one after `(seq, head)` (see the module docs for the order
/// of steps). Returns the new epoch's secrets, its open files, and the final checkpoint if a
/// file sink did not take it (the caller faults until it does).
fn begin_epoch(
    dir: &Path,
    old: &EpochSecrets,
    seq: u64,
    head: &[u8; 32],
    to: &Recipient,
    sinks: &Sinks,
) -> Result<(EpochSecrets, File, File, Option<Checkpoint>), AuditError> {
    let epoch = old
        .epoch
        .checked_add(1)
        .ok_or_else(|| AuditError::Key("epoch counter exhausted".into()))?;
    let next = EpochSecrets::generate(epoch);
    write_wrap(dir, to, &next)?;
    next.store(&dir.join(keys::NEXT_KEY))?;
    let last = Checkpoint::sign(old, seq, head, &next)?;
    checkpoint::append(
        &mut checkpoint::open_for_append(dir, old.epoch, true)?,
        &last,
    )?;
    let sent = sinks.send(&last);
    let (seg, cp) = create_epoch_files(dir, epoch)?;
    promote_next_key(dir)?;
    Ok((next, seg, cp, sent.err().map(|_| last)))
}

/// The old epoch's key is overwritten where it lies, then the next key takes its name.
fn promote_next_key(dir: &Path) -> Result<(), AuditError> {
    let (current, next) = (dir.join(keys::CURRENT_KEY), dir.join(keys::NEXT_KEY));
    keys::erase_file(&current)?;
    std::fs::rename(&next, &current)
        .map_err(|e| AuditError::Io(format!("{}: {e}", next.display())))?;
    keys::sync_dir(&current);
    Ok(())
}

/// A start that finds `next.key` (a checkpoint or an epoch handover was being made): finish
/// the step if the checkpoint naming that key is durable, else forget the key.
fn recover_handover(dir: &Path) -> Result<Option<String>, AuditError> {
    let path = dir.join(keys::NEXT_KEY);
    if !securerun_models::fsutil::exists_no_follow(&path) {
        return Ok(None);
    }
    let discard = |what: String| -> Result<Option<String>, AuditError> {
        keys::erase_file(&path)?;
        let _ = std::fs::remove_file(&path);
        Ok(Some(what))
    };
    let Ok(next) = EpochSecrets::load(&path) else {
        return discard("an unreadable next.key was discarded".into());
    };
    // The newest checkpoint on disk: of next's epoch (a key change within it), else of the
    // epoch before (a handover to it).
    let mut last = None;
    for epoch in [next.epoch, next.epoch.saturating_sub(1)] {
        let file = checkpoint::read_epoch(dir, epoch).map_err(AuditError::Untrusted)?;
        if let Some(c) = file.list.last() {
            last = Some(c.clone());
            break;
        }
    }
    let handover = next.epoch != last.as_ref().map_or(next.epoch, |c| c.epoch);
    let committed = last.as_ref().is_some_and(|c| {
        Some(c.next_key.as_str()) == next.public_key().to_pem().ok().as_deref()
            && (!handover
                || (c.next_epoch == Some(next.epoch)
                    && c.next_commit.as_deref() == Some(next.record_commitment().as_str())))
    });
    if !committed {
        return discard(format!(
            "an interrupted checkpoint of epoch {} had not been written; its key was discarded",
            next.epoch
        ));
    }
    if handover {
        create_epoch_files(dir, next.epoch)?;
    }
    promote_next_key(dir)?;
    Ok(Some(format!(
        "an interrupted checkpoint (epoch {}) was completed",
        next.epoch
    )))
}

/// What went wrong with the log, while it is wrong.
struct Fault {
    since_ms: u64,
    since: Instant,
    error: String,
    refused: u64,
}

pub(super) struct Writer {
    /// `writer.lock`, held while this thread runs (until its last checkpoint is written), so
    /// a next writer never starts over a log this one is still closing.
    _lock: File,
    dir: PathBuf,
    secrets: EpochSecrets,
    recipient: Recipient,
    seg: File,
    cp: File,
    len: u64,
    seq: u64,
    head: [u8; 32],
    options: WriterOptions,
    sinks: Sinks,
    /// Every written record also goes here (set by the log after opening).
    pub(super) streams: super::stream::Streams,
    counters: Arc<Counters>,
    epoch_started: Instant,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    last_file_check: Instant,
    fault: Option<Fault>,
    /// A checkpoint a file sink did not take: resent before anything else is written.
    unsent: Option<Checkpoint>,
    /// What the start found (reported in the first record).
    notes: Vec<String>,
}

/// How long a checkpoint (and the close) waits for record streams to send what they hold.
const STREAM_DRAIN: Duration = Duration::from_secs(2);

impl Writer {
    pub(super) fn open(
        dir: &Path,
        options: WriterOptions,
        sinks: Sinks,
        counters: Arc<Counters>,
        lock: File,
    ) -> Result<Writer, AuditError> {
        let untrusted = |what: String| AuditError::Untrusted(format!("{}: {what}", dir.display()));
        let mut notes: Vec<String> = recover_handover(dir)?.into_iter().collect();
        let current = dir.join(keys::CURRENT_KEY);
        if !securerun_models::fsutil::exists_no_follow(&current) {
            return Err(untrusted(
                "current.key is missing: this host cannot continue the log (it never re-creates the log over existing files)".into(),
            ));
        }
        let secrets = EpochSecrets::load(&current)?;
        let root = checkpoint::read_root(&dir.join(checkpoint::ROOT_PUB))?;
        let recipient = Recipient::load(&dir.join(recipient::RECIPIENT))?;
        let epochs = checkpoint::walk(dir, &root, |_| {}).map_err(|p| untrusted(p.to_string()))?;
        let open = epochs.last().expect("the walk yields epoch 0 at least");
        let mine = open.epoch == secrets.epoch
            && open.signer().to_pem().ok() == secrets.public_key().to_pem().ok()
            && open.commit.as_deref() == Some(secrets.record_commitment().as_str());
        if !mine {
            return Err(untrusted(format!(
                "current.key (epoch {}) is not the key the newest handover (epoch {}) names",
                secrets.epoch, open.epoch
            )));
        }
        let listing = Listing::of(dir).map_err(|e| AuditError::Io(e.to_string()))?;
        if !listing.unknown.is_empty() {
            return Err(untrusted(format!(
                "files not made by the writer: {}",
                listing.unknown.join(", ")
            )));
        }
        // A wrap of the next epoch alone is left by an interrupted handover (replaced below).
        let planted = listing.files.keys().find(|(e, kind)| {
            *e > secrets.epoch && !(*kind == Kind::Wrap && *e == secrets.epoch + 1)
        });
        if let Some((n, kind)) = planted {
            return Err(untrusted(format!(
                "{} belongs to epoch {n}, after the current epoch {} (planted)",
                kind.name(*n),
                secrets.epoch
            )));
        }
        let seg_path = dir.join(segment::segment_name(secrets.epoch));
        let (seq, head, good_len, torn) =
            authenticate_segment(&seg_path, &secrets, open).map_err(untrusted)?;
        if let Some(at) = torn {
            notes.push(cut_torn_tail(dir, &seg_path, good_len, at, seq).map_err(untrusted)?);
        }
        if let Some(at) = open.torn_at {
            let f = checkpoint::open_for_append(dir, secrets.epoch, false)?;
            f.set_len(at)
                .and_then(|_| f.sync_all())
                .map_err(|e| AuditError::Io(e.to_string()))?;
            notes.push(format!(
                "{} ended in an incomplete line at byte {at}; it was cut",
                Kind::Checkpoints.name(secrets.epoch)
            ));
        }
        let (next, seg, cp, unsent) = begin_epoch(dir, &secrets, seq, &head, &recipient, &sinks)?;
        drop(secrets);
        let now = Instant::now();
        Ok(Writer {
            _lock: lock,
            dir: dir.to_path_buf(),
            secrets: next,
            recipient,
            seg,
            cp,
            len: 0,
            seq,
            head,
            options,
            sinks,
            streams: super::stream::Streams::start(Vec::new()),
            counters,
            epoch_started: now,
            since_checkpoint: 0,
            last_checkpoint: now,
            last_file_check: now,
            fault: None,
            unsent,
            notes,
        })
    }

    /// The first record of the epoch this start began.
    pub(super) fn epoch_start_record(&mut self) -> AuditRecord {
        let mut r = AuditRecord::event("audit_epoch_start").with_detail(format!(
            "epoch {}, after record {}",
            self.secrets.epoch, self.seq
        ));
        if !self.notes.is_empty() {
            r.outcome = Some("recovered".into());
            r.detail = Some(format!(
                "{}; {}",
                r.detail.unwrap_or_default(),
                self.notes.join("; ")
            ));
            self.notes.clear();
        }
        r
    }

    /// Writes until every sender is gone or a [`Pending::Close`] arrives; returns the closer
    /// to answer once this writer (and its lock) is dropped.
    pub(super) fn run(
        mut self,
        rx: std_mpsc::Receiver<Pending>,
        healthy: Arc<AtomicBool>,
        last_error: Arc<Mutex<Option<String>>>,
    ) -> Option<std_mpsc::SyncSender<Result<(), AuditError>>> {
        let mut closer = None;
        let report = |w: &Writer| {
            healthy.store(w.fault.is_none(), Ordering::Relaxed);
            if let Ok(mut e) = last_error.lock() {
                *e = w.fault.as_ref().map(|f| f.error.clone());
            }
        };
        loop {
            let first = match rx.recv_timeout(TICK) {
                Ok(Pending::Checkpoint(done)) => {
                    let r = self.checkpoint_if_any();
                    report(&self);
                    self.streams.drain(STREAM_DRAIN);
                    let _ = done.send(r);
                    continue;
                }
                Ok(Pending::Retain(from, done)) => {
                    let r = self.retain(from);
                    report(&self);
                    let _ = done.send(r);
                    continue;
                }
                Ok(Pending::Close(done)) => {
                    closer = Some(done);
                    break;
                }
                Ok(Pending::Record { record, done }) => (*record, done),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    self.tick();
                    report(&self);
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let (mut records, mut waiting) = (vec![first.0], vec![first.1]);
            // A checkpoint request met while batching runs after the batch.
            let mut checkpoint_wanted = None;
            let mut retain_wanted = None;
            while records.len() < BATCH && checkpoint_wanted.is_none() && retain_wanted.is_none() {
                match rx.try_recv() {
                    Ok(Pending::Record { record, done }) => {
                        records.push(*record);
                        waiting.push(done);
                    }
                    Ok(Pending::Checkpoint(done)) => checkpoint_wanted = Some(done),
                    Ok(Pending::Retain(from, done)) => retain_wanted = Some((from, done)),
                    Ok(Pending::Close(done)) => {
                        closer = Some(done);
                        break;
                    }
                    Err(_) => break,
                }
            }
            if self.last_file_check.elapsed() >= TICK {
                self.check_live_files();
            }
            let result = self.append(&records);
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
                let r = result.clone().and_then(|_| self.checkpoint_if_any());
                self.streams.drain(STREAM_DRAIN);
                let _ = done.send(r);
            } else if let Some((from, done)) = retain_wanted {
                let _ = done.send(result.clone().and_then(|_| self.retain(from)));
            } else if result.is_ok() {
                self.checkpoint_if_due();
            }
            report(&self);
            if closer.is_some() {
                break;
            }
        }
        // All senders gone or asked to close: the last batch is already synced. A final
        // checkpoint attests how far the log went.
        if let Err(e) = self.checkpoint_if_any() {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
        self.streams.drain(STREAM_DRAIN);
        closer
    }

    /// Once a second without traffic: retry a failed log, check the live files and file
    /// sinks, checkpoint.
    fn tick(&mut self) {
        self.check_live_files();
        if let Err(e) = self.sinks.check_files() {
            if self.fault.is_none() {
                tracing::error!(error = %e, "a checkpoint sink cannot be written; requests are refused until it can");
            }
            self.fail(e.to_string(), 0);
        }
        if self.fault.is_some() {
            let _ = self.append(&[]);
        }
        if self.fault.is_none() {
            self.checkpoint_if_due();
        }
    }

    fn fail(&mut self, error: String, refused: u64) -> AuditError {
        match &mut self.fault {
            Some(f) => f.refused += refused,
            None => {
                self.counters.faults.fetch_add(1, Ordering::Relaxed);
                self.fault = Some(Fault {
                    since_ms: super::now_ms(),
                    since: Instant::now(),
                    error: error.clone(),
                    refused,
                });
            }
        }
        self.counters
            .records_refused
            .fetch_add(refused, Ordering::Relaxed);
        AuditError::Io(error)
    }

    fn checkpoint_if_any(&mut self) -> Result<(), AuditError> {
        if self.fault.is_some() {
            self.append(&[])?;
        }
        if self.since_checkpoint > 0 {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Signs a checkpoint if enough records or time have passed since the last one.
    fn checkpoint_if_due(&mut self) {
        let due = self.since_checkpoint >= checkpoint::EVERY_RECORDS
            || (self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= checkpoint::EVERY);
        if due {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "audit checkpoint failed; requests are refused until it succeeds");
            }
        }
    }

    /// Signs a checkpoint with the current one-time key, naming a fresh one; the used key is
    /// then erased (on disk by [`promote_next_key`], in memory when it is dropped). Staged
    /// through `next.key` like a handover, so a crash at any step loses no key the checkpoint
    /// chain needs.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        self.checkpoint_retaining(None)
    }

    /// A checkpoint that also states where retention lets the log begin (see
    /// [`Checkpoint::retained_from`]).
    /// Signs `retained_from`, never beyond the current epoch: the open epoch is never
    /// shredded, so no record (a spooled one claiming epoch 4,294,967,295, say) can sign away
    /// segments that do not exist yet.
    pub(super) fn retain(&mut self, from: u32) -> Result<(), AuditError> {
        if self.fault.is_some() {
            self.append(&[])?;
        }
        self.checkpoint_retaining(Some(from.min(self.secrets.epoch)))
    }

    fn checkpoint_retaining(&mut self, retained_from: Option<u32>) -> Result<(), AuditError> {
        let next = self.secrets.with_next_signing_key();
        let c =
            Checkpoint::sign_retaining(&self.secrets, self.seq, &self.head, &next, retained_from)?;
        let written = next
            .store(&self.dir.join(keys::NEXT_KEY))
            .and_then(|_| checkpoint::append(&mut self.cp, &c));
        if let Err(e) = written {
            // Nothing changed: a failed append is cut back; the staged key is replaced by the
            // next attempt, or discarded by the next start.
            return Err(self.fail(format!("checkpoint: {e}"), 0));
        }
        // The checkpoint is durable: from now on only the key it names may sign.
        self.secrets = next;
        if let Err(e) = promote_next_key(&self.dir) {
            // next.key holds the key; the next start completes the step.
            return Err(self.fail(format!("checkpoint key: {e}"), 0));
        }
        if let Err(e) = self.sinks.send(&c) {
            self.unsent = Some(c);
            return Err(self.fail(e.to_string(), 0));
        }
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Seals and writes `records` (after the fault report, if the log is recovering), then
    /// syncs. On failure the file is cut back to its last good length, so a failed batch leaves
    /// no partial frame behind, and the log is faulted until a write succeeds.
    pub(super) fn append(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
        if self.fault.is_none()
            && (self.len > ROTATE_BYTES
                || self.epoch_started.elapsed() >= self.options.rotate_after)
        {
            if let Err(e) = self.rotate() {
                return Err(self.fail(format!("starting a new epoch: {e}"), records.len() as u64));
            }
        }
        if self.fault.is_some() {
            if let Err(e) = self.sinks.check_files() {
                return Err(self.fail(e.to_string(), records.len() as u64));
            }
        }
        if let Some(c) = &self.unsent {
            if let Err(e) = self.sinks.send(c) {
                return Err(self.fail(e.to_string(), records.len() as u64));
            }
            self.unsent = None;
        }
        let recovery = self.fault.as_ref().map(|f| {
            let mut r = AuditRecord::event("audit_fault");
            r.outcome = Some("recovered".into());
            r.count = Some(f.refused);
            r.detail = Some(format!(
                "the audit log was not writable from unix ms {} for {} ms ({}); {} records could not be written and their requests were refused",
                f.since_ms,
                f.since.elapsed().as_millis(),
                f.error,
                f.refused
            ));
            r
        });
        let all: Vec<&AuditRecord> = recovery.iter().chain(records.iter()).collect();
        if all.is_empty() {
            return Ok(());
        }
        let cipher = segment::cipher(self.secrets.record_key());
        let (mut seq, mut head) = (self.seq, self.head);
        let mut bytes = Vec::new();
        for r in &all {
            seq += 1;
            let json = serde_json::to_vec(r).map_err(|e| AuditError::Io(e.to_string()))?;
            let mac = |d: &[u8]| self.secrets.frame_mac(d);
            let (frame, next) = segment::seal(&cipher, mac, seq, self.secrets.epoch, &head, &json);
            bytes.extend_from_slice(&frame);
            head = next;
        }
        drop(cipher);
        let written = self
            .seg
            .write_all(&bytes)
            .and_then(|_| match self.options.durability {
                Durability::Fsync => self.seg.sync_data(),
                Durability::Buffered => Ok(()),
            });
        if let Err(e) = written {
            let _ = self.seg.set_len(self.len);
            return Err(self.fail(e.to_string(), records.len() as u64));
        }
        self.len += bytes.len() as u64;
        self.seq = seq;
        self.head = head;
        self.since_checkpoint += all.len() as u64;
        // Written (and synced, when durable): now a copy may leave for the SIEM.
        self.streams.send(&all);
        if recovery.is_some() {
            self.fault = None;
            tracing::warn!("the audit log is writable again");
        }
        Ok(())
    }

    /// Ends the current epoch with its final checkpoint and begins the next (fresh keys); the
    /// current keys are then forgotten. The new epoch's first record says why it began.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let (next, seg, cp, unsent) = begin_epoch(
            &self.dir,
            &self.secrets,
            self.seq,
            &self.head,
            &self.recipient,
            &self.sinks,
        )?;
        if unsent.is_some() {
            self.unsent = unsent;
            self.fail(
                "a checkpoint sink did not take the epoch's final checkpoint".into(),
                0,
            );
        }
        self.secrets = next;
        self.seg = seg;
        self.cp = cp;
        self.len = 0;
        self.epoch_started = Instant::now();
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        let first = AuditRecord::event("audit_epoch_start").with_detail(format!(
            "epoch {}, after record {} (rotation)",
            self.secrets.epoch, self.seq
        ));
        self.append(std::slice::from_ref(&first))
    }

    /// Checks that the live segment and checkpoint file are still the files being written;
    /// restores one that was deleted or replaced (see the module docs).
    fn check_live_files(&mut self) {
        self.last_file_check = Instant::now();
        for kind in [Kind::Segment, Kind::Checkpoints] {
            let name = kind.name(self.secrets.epoch);
            let path = self.dir.join(&name);
            let file = match kind {
                Kind::Segment => &self.seg,
                _ => &self.cp,
            };
            let Ok(open) = file.metadata() else { continue };
            let on_disk = std::fs::symlink_metadata(&path).ok();
            let same = on_disk
                .as_ref()
                .is_some_and(|m| m.dev() == open.dev() && m.ino() == open.ino())
                && open.nlink() > 0;
            if same {
                continue;
            }
            let what = if on_disk.is_some() {
                "replaced"
            } else {
                "deleted"
            };
            let mut error = format!("{name} was {what} while the server ran");
            match restore(&path, file, on_disk.is_some()) {
                Ok((restored, kept)) => {
                    self.counters.files_restored.fetch_add(1, Ordering::Relaxed);
                    error.push_str(&format!(
                        "; it was restored from the open file ({} bytes){}",
                        open.len(),
                        kept.map(|k| format!(" and the replacement kept as {k}"))
                            .unwrap_or_default()
                    ));
                    match kind {
                        Kind::Segment => self.seg = restored,
                        _ => self.cp = restored,
                    }
                    tracing::error!("{error}");
                    // Recorded as a fault; the retry that follows writes the record.
                    self.fail(error, 0);
                }
                Err(e) => {
                    tracing::error!("{error}; restoring it failed: {e}");
                    self.fail(format!("{error}; restoring it failed: {e}"), 0);
                }
            }
        }
        if self.fault.is_some() {
            let _ = self.append(&[]);
        }
    }
}

/// Rewrites `path` from the still-open `file` (and keeps whatever replaced it aside).
fn restore(path: &Path, file: &File, replaced: bool) -> Result<(File, Option<String>), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let kept = if replaced {
        let aside = format!("replaced-{}-{name}", super::now_ms());
        std::fs::rename(path, dir.join(&aside)).map_err(|e| e.to_string())?;
        Some(aside)
    } else {
        None
    };
    let tmp = dir.join(format!(".restore-{name}"));
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = file.read_at(&mut buf, pos).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        pos += n as u64;
    }
    out.sync_all().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())?;
    keys::sync_dir(path);
    let reopened = open_append(path).map_err(|e| e.to_string())?;
    Ok((reopened, kept))
}

/// Most bytes a crash can leave after the last complete frame (a batch being written); more
/// than this after an unreadable frame is damage, not a crash, and is not cut.
const MAX_TORN_TAIL: u64 = 4 << 20;

/// Cuts a torn tail off the newest segment, keeping the cut bytes aside as evidence
/// (`torn-TIME-NAME`, which no reader mistakes for a segment).
fn cut_torn_tail(dir: &Path, path: &Path, good: u64, at: u64, seq: u64) -> Result<String, String> {
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let f = open_append(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len - good > MAX_TORN_TAIL {
        return Err(format!(
            "{name}: {} bytes after record {seq} (offset {at}) are not records; a crash leaves at most a batch",
            len - good
        ));
    }
    let mut tail = vec![0u8; (len - good) as usize];
    f.read_exact_at(&mut tail, good)
        .map_err(|e| e.to_string())?;
    let aside = format!("torn-{}-{name}", super::now_ms());
    keys::write_secret(&dir.join(&aside), &tail).map_err(|e| e.to_string())?;
    f.set_len(good)
        .and_then(|_| f.sync_all())
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "{name} ended in an incomplete record at byte {at} (after record {seq}); the {} bytes were cut and kept as {aside}",
        len - good
    ))
}

/// Authenticates every frame of the open epoch's segment with its record key, from where the
/// epoch began, against its checkpoints. Returns the chain state after the last good frame,
/// the segment's good length, and where a torn tail starts (if any).
fn authenticate_segment(
    path: &Path,
    secrets: &EpochSecrets,
    open: &checkpoint::Epoch,
) -> Result<(u64, [u8; 32], u64, Option<u64>), String> {
    let name = segment::segment_name(secrets.epoch);
    let mut reader = segment::Reader::open(path).map_err(|e| format!("{name}: {e}"))?;
    let cipher = segment::cipher(secrets.record_key());
    let (mut seq, mut head) = open.start;
    let mut expect: std::collections::BTreeMap<u64, [u8; 32]> = open
        .checkpoints
        .iter()
        .filter_map(|c| Some((c.seq, c.head_bytes()?)))
        .collect();
    let mut good = 0u64;
    let mut torn = None;
    if let Some(h) = expect.remove(&seq) {
        if h != head {
            return Err(format!(
                "a checkpoint of epoch {} disagrees with its start",
                secrets.epoch
            ));
        }
    }
    loop {
        let frame = match reader.next_frame().map_err(|e| format!("{name}: {e}"))? {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(t) => {
                torn = Some(t.offset);
                break;
            }
        };
        let expected = seq
            .checked_add(1)
            .ok_or_else(|| format!("{name}: record count overflows"))?;
        let place = format!("{name} offset {} (record {expected})", frame.offset);
        if frame.seq != expected || frame.epoch != secrets.epoch {
            return Err(format!("{place}: out of sequence"));
        }
        if frame.open(&cipher, &head).is_none()
            || !frame.writer_made(|d| secrets.frame_mac(d), &head)
        {
            return Err(format!(
                "{place}: the record was not written by this host's writer (it does not authenticate with the writer's keys)"
            ));
        }
        head = segment::chain(&head, &frame.body);
        seq = frame.seq;
        good += frame.len_on_disk();
        if let Some(h) = expect.remove(&seq) {
            if h != head {
                return Err(format!(
                    "{place}: a signed checkpoint attests another record"
                ));
            }
        }
    }
    if let Some((s, _)) = expect.iter().next() {
        return Err(format!(
            "a signed checkpoint attests record {s}, but {name} ends at record {seq}: records were cut"
        ));
    }
    Ok((seq, head, good, torn))
}

#[cfg(test)]
mod tests {
    use super::super::{verify, AuditLog, AuditRecord, Durability};
    use super::*;

    fn material_check(dir: &Path, read: Option<&ReadKey>) -> Result<verify::Verified, String> {
        let root = checkpoint::read_root(&dir.join(checkpoint::ROOT_PUB)).unwrap();
        let m = verify::Material {
            root: &root,
            read,
            anchors: &[],
        };
        verify::verify(dir, &m, |_, _| {}).map_err(|e| e.to_string())
    }

    #[test]
    fn restarts_rotate_epochs_and_everything_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        for round in 0..3 {
            let log = AuditLog::open(&dir, Durability::Fsync).unwrap();
            for i in 0..5 {
                log.append_blocking(AuditRecord::event(&format!("r{round}-{i}")))
                    .unwrap();
            }
            if round == 1 {
                log.checkpoint_now().unwrap();
                log.append_blocking(AuditRecord::event("after-checkpoint"))
                    .unwrap();
                // Dropped without close: a crash after the last write.
                drop(log);
                std::thread::sleep(Duration::from_millis(200));
            } else {
                log.close().unwrap();
            }
        }
        let read = ReadKey::load(&dir.join(recipient::READ_KEY)).unwrap();
        let v = material_check(&dir, Some(&read)).unwrap();
        let events: Vec<&str> = v.records.iter().map(|(_, r)| r.event.as_str()).collect();
        assert_eq!(
            events.iter().filter(|e| **e == "audit_epoch_start").count(),
            3
        );
        assert!(events.contains(&"after-checkpoint"));
        assert_eq!(v.open_epoch, 4);
        let integrity = material_check(&dir, None).unwrap();
        assert_eq!(integrity.count, v.count);
        assert!(integrity.records.is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_kept_and_reported_and_planted_files_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let log = AuditLog::open(&dir, Durability::Fsync).unwrap();
        log.append_blocking(AuditRecord::event("one")).unwrap();
        log.close().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let seg = dir.join(segment::segment_name(2));
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 9, 9]).unwrap();
        drop(f);
        let log = AuditLog::open(&dir, Durability::Fsync).unwrap();
        log.close().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let read = ReadKey::load(&dir.join(recipient::READ_KEY)).unwrap();
        let v = material_check(&dir, Some(&read)).unwrap();
        assert!(v
            .records
            .iter()
            .any(|(_, r)| r.outcome.as_deref() == Some("recovered")
                && r.detail
                    .as_deref()
                    .unwrap_or("")
                    .contains("incomplete record")));
        // A planted future segment stops the writer.
        std::fs::write(dir.join(segment::segment_name(9)), b"").unwrap();
        match AuditLog::open(&dir, Durability::Fsync) {
            Err(AuditError::Untrusted(m)) => assert!(m.contains("planted"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        std::fs::remove_file(dir.join(segment::segment_name(9))).unwrap();
        // A missing current.key never leads to a new root over the records.
        std::fs::rename(dir.join(keys::CURRENT_KEY), tmp.path().join("k")).unwrap();
        assert!(matches!(
            AuditLog::open(&dir, Durability::Fsync),
            Err(AuditError::Untrusted(_))
        ));
        std::fs::rename(tmp.path().join("k"), dir.join(keys::CURRENT_KEY)).unwrap();
        AuditLog::open(&dir, Durability::Fsync)
            .unwrap()
            .close()
            .unwrap();
    }
}
