//! Operator actions taken by CLI commands (`token`, `trust`, `lockdown`, `audit shred`).
//!
//! Only one process writes the log (it holds `writer.lock`). A command run while no server is
//! writing appends its record itself; while a server runs, the command leaves the record in
//! `audit/spool/` (one small file each, 0600, no secrets, synced) and the server records it
//! within a second, marked as spooled, with the time the action happened (bounded by the
//! file's age). A server that starts records whatever an earlier one left behind, so a spooled
//! action is never lost. Either way the record is durable before the command acts.

use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};

use super::{AuditError, AuditLog, AuditRecord};

const SPOOL: &str = "spool";
/// Where entries that are not valid spooled records are moved once recorded (kept as
/// evidence, out of the spool, so they are recorded once rather than at every pass).
const REJECTED: &str = "spool-rejected";

/// The events CLI commands spool: anything else in the spool is not ours (`spool_invalid`).
const SPOOLED_EVENTS: &[&str] = &[
    "token_created",
    "token_create_failed",
    "consent_content_given",
    "token_revoked",
    "tokens_revoked_all",
    "trust_key_added",
    "trust_key_removed",
    "lockdown_on",
    "lockdown_off",
    "audit_recipient_changed",
    "audit_migrated",
    super::retention::SHREDDED,
];
/// Spool files read per pass at most, and their size cap (a record is a few hundred bytes).
/// A server's pass runs every quarter second and a shutdown waits for the one under way, so
/// this also bounds that wait; the rest waits for the next pass (or the next start).
const MAX_FILES: usize = 256;
const MAX_FILE: u64 = 64 * 1024;

/// Spooled records, oldest first, and the files they came from (removed once recorded).
#[derive(Default)]
pub struct Spooled {
    pub records: Vec<AuditRecord>,
    paths: Vec<PathBuf>,
    /// Entries recorded as invalid: moved aside once their record is durable.
    rejected: Vec<PathBuf>,
}

/// Leaves `record` for the writer. The file name sorts by time.
pub fn put(dir: &Path, record: &AuditRecord) -> Result<(), AuditError> {
    let spool = dir.join(SPOOL);
    crate::trust::create_private_dir(&spool)
        .map_err(|e| AuditError::Io(format!("{}: {e}", spool.display())))?;
    let mut nonce = [0u8; 8];
    OsRng.fill_bytes(&mut nonce);
    let name = format!("{:016}-{}.json", record.time_ms, hex::encode(nonce));
    let json = serde_json::to_vec(record).map_err(|e| AuditError::Io(e.to_string()))?;
    // Written aside and renamed: the writer never sees half a record.
    super::keys::write_secret(&spool.join(name), &json)
}

/// Reads the spool. The spool directory must be a real directory (not a link) owned by the
/// state directory's owner and writable by nobody else; each file must be a regular file with
/// one link, owned by that owner. A file that fails these checks, or does not parse, is
/// recorded as `spool_invalid` (its name and the reason, never its bytes) so a planted file
/// cannot vanish unnoticed. Each record is marked as spooled, and its time is bounded by the
/// file's change time (which its writer cannot set): a record cannot claim to be older than
/// its file, nor newer than now.
pub fn take(dir: &Path) -> Result<Spooled, AuditError> {
    use std::os::unix::fs::MetadataExt;
    let spool = dir.join(SPOOL);
    let owner = std::fs::symlink_metadata(dir)
        .map_err(|e| AuditError::Io(format!("{}: {e}", dir.display())))?
        .uid();
    let meta = match std::fs::symlink_metadata(&spool) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Spooled::default()),
        Err(e) => return Err(AuditError::Io(format!("{}: {e}", spool.display()))),
    };
    if !meta.is_dir() || meta.uid() != owner || meta.mode() & 0o022 != 0 {
        return Err(AuditError::Untrusted(format!(
            "{}: the spool must be a directory owned by the state directory's owner and writable by nobody else",
            spool.display()
        )));
    }
    let entries = std::fs::read_dir(&spool)
        .map_err(|e| AuditError::Io(format!("{}: {e}", spool.display())))?;
    // Dot-files are records being written (written aside, then renamed); every other entry is
    // a record or is recorded as invalid.
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names.truncate(MAX_FILES);
    let mut out = Spooled::default();
    let now = super::now_ms();
    for name in names {
        let path = spool.join(&name);
        let record = if name.ends_with(".json") {
            read_spooled(&path, owner)
        } else {
            Err("not a spooled record's name".into())
        };
        let record = record.map(|(mut r, changed_ms)| {
            let bounded = r.time_ms.clamp(changed_ms.saturating_sub(CLOCK_SLACK_MS), now);
            if bounded != r.time_ms {
                r.detail = Some(format!(
                    "{} (its stated time, unix ms {}, was outside the spool file's age and was bounded)",
                    r.detail.take().unwrap_or_default(),
                    r.time_ms
                ));
                r.time_ms = bounded;
            }
            r.spooled = Some(true);
            r
        });
        match record {
            Ok(r) => {
                out.records.push(r);
                out.paths.push(path);
            }
            Err(e) => {
                // The name as text a reader can trust (control characters escaped).
                let shown: String = name.escape_debug().take(200).collect();
                let mut r =
                    AuditRecord::event("spool_invalid").with_detail(format!("{shown}: {e}"));
                r.spooled = Some(true);
                out.records.push(r);
                out.rejected.push(path);
            }
        }
    }
    Ok(out)
}

/// How much earlier than its file's change time a spooled record may say it happened (the
/// command writes the record, then the file).
const CLOCK_SLACK_MS: u64 = 60_000;

fn read_spooled(path: &Path, owner: u32) -> Result<(AuditRecord, u64), String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let f = super::segment::open_regular(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if meta.uid() != owner || meta.nlink() != 1 {
        return Err(
            "not a file the state directory's owner created (owner or links differ)".into(),
        );
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE {
        return Err("too large".into());
    }
    let record = serde_json::from_slice::<AuditRecord>(&bytes).map_err(|e| e.to_string())?;
    if !SPOOLED_EVENTS.contains(&record.event.as_str()) {
        return Err("not an event CLI commands record".into());
    }
    let changed_ms =
        (meta.ctime().max(0) as u64) * 1000 + meta.ctime_nsec().max(0) as u64 / 1_000_000;
    Ok((record, changed_ms))
}

/// Removes spool files once their records are durable, and moves rejected entries (whatever
/// they are: files, directories, links) to `spool-rejected/`, so each is recorded once.
pub fn remove(spooled: &Spooled) {
    for p in &spooled.paths {
        let _ = std::fs::remove_file(p);
    }
    if spooled.rejected.is_empty() {
        return;
    }
    let Some(dir) = spooled
        .rejected
        .first()
        .and_then(|p| p.parent())
        .and_then(|spool| spool.parent())
        .map(|audit| audit.join(REJECTED))
    else {
        return;
    };
    if crate::trust::create_private_dir(&dir).is_err() {
        return;
    }
    for p in &spooled.rejected {
        let mut nonce = [0u8; 8];
        OsRng.fill_bytes(&mut nonce);
        let name = format!("{}-{}", super::now_ms(), hex::encode(nonce));
        if std::fs::rename(p, dir.join(name)).is_err() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Records an operator action from a CLI command before it is taken: directly (durable) if no
/// server is writing this log, else through the spool (durable in the spool, recorded by the
/// server within a second). An error means nothing was recorded, and the caller must not act.
/// Creates the log if this state directory has none yet.
pub fn record_admin(dir: &Path, record: AuditRecord) -> Result<Recorded, AuditError> {
    match AuditLog::open(dir, super::Durability::Fsync) {
        Ok(log) => {
            let shredded = (record.event == super::retention::SHREDDED)
                .then_some(record.epoch)
                .flatten();
            log.append_blocking(record)?;
            if let Some(from) = shredded {
                log.retain(from)?;
            }
            log.close()?;
            Ok(Recorded::Direct)
        }
        Err(AuditError::Busy(_)) => put(dir, &record).map(|_| Recorded::Spooled),
        Err(e) => Err(e),
    }
}

/// How an operator action was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// In the log, durable.
    Direct,
    /// In the spool, durable; a running server records it within a second.
    Spooled,
}
