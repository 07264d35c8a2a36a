//! Operator actions taken by CLI commands (`token`, `trust`, `lockdown`, `audit shred`).
//!
//! Only one process writes the log (it holds `writer.lock`). A command run while no server is
//! writing appends its record itself; while a server runs, the command leaves the record in
//! `audit/spool/` (one small file each, 0600, no secrets) and the server records it within a
//! second, keeping the time the action happened. A server that starts records whatever an
//! earlier one left behind, so a spooled action is never lost.

use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};

use super::{AuditError, AuditLog, AuditRecord};

const SPOOL: &str = "spool";
/// Spool files read per pass at most, and their size cap (a record is a few hundred bytes).
const MAX_FILES: usize = 10_000;
const MAX_FILE: u64 = 64 * 1024;

/// Spooled records, oldest first, and the files they came from (removed once recorded).
#[derive(Default)]
pub struct Spooled {
    pub records: Vec<AuditRecord>,
    paths: Vec<PathBuf>,
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

/// Reads every complete spool file. One that does not parse is recorded as such (its name
/// and the parse error, never its bytes), so a planted file cannot vanish unnoticed.
pub fn take(dir: &Path) -> Result<Spooled, AuditError> {
    let spool = dir.join(SPOOL);
    let entries = match std::fs::read_dir(&spool) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Spooled::default()),
        Err(e) => return Err(AuditError::Io(format!("{}: {e}", spool.display()))),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
        .collect();
    names.sort();
    names.truncate(MAX_FILES);
    let mut out = Spooled::default();
    for name in names {
        let path = spool.join(&name);
        let record = securerun_models::fsutil::read_bounded(&path, MAX_FILE)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<AuditRecord>(&b).map_err(|e| e.to_string()));
        out.records.push(record.unwrap_or_else(|e| {
            AuditRecord::event("spool_invalid").with_detail(format!("{name}: {e}"))
        }));
        out.paths.push(path);
    }
    Ok(out)
}

/// Removes spool files once their records are durable.
pub fn remove(spooled: &Spooled) {
    for p in &spooled.paths {
        let _ = std::fs::remove_file(p);
    }
}

/// Records an operator action from a CLI command: directly if no server is writing this log;
/// else, with `spool_if_busy`, through the spool (without, the running server is trusted to
/// record the change it observes). Creates the log if this state directory has none yet.
pub fn record_admin(
    dir: &Path,
    record: AuditRecord,
    spool_if_busy: bool,
) -> Result<(), AuditError> {
    match AuditLog::open(dir, super::Durability::Fsync) {
        Ok(log) => {
            log.append_blocking(record)?;
            log.close()
        }
        Err(AuditError::Busy(_)) if spool_if_busy => put(dir, &record),
        Err(AuditError::Busy(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
