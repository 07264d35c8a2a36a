//! Retention: removing whole old epochs.
//!
//! Each epoch's records are readable only through its record key, which exists only in its
//! wrap file (`key-E.wrap`, encrypted to the auditor). Retention overwrites and deletes the
//! wrap files and segments of the epochs before a point. Copies made earlier (backups, the
//! auditor's own copy) stay readable with the read key they were wrapped to: for shredding to
//! reach them, the auditor rotates to a new read key (`audit keygen` + `audit recipient`) and
//! destroys the old one once the epochs wrapped to it are gone.
//!
//! Retention acts only on a log that verifies completely against the root key: it uses signed
//! checkpoints only (an epoch's age is its signed final checkpoint's time), refuses on any line
//! or file that does not verify, and never touches the open epoch. The checkpoint files stay
//! (they hold counts and hashes, no personal data), so the rest verifies from where it starts.

use std::path::{Path, PathBuf};

use super::checkpoint;
use super::recipient;
use super::segment;
use super::verify;
use crate::signing::PublicKey;

/// The event of a shredding's record; the writer answers it with a signed checkpoint stating
/// where the log may now begin (`retained_from`).
pub const SHREDDED: &str = "audit_shredded";

/// The newest signed statement of where retention lets the log begin (1 if none).
pub fn retained_from(epochs: &[checkpoint::Epoch]) -> u32 {
    epochs
        .iter()
        .flat_map(|e| e.checkpoints.iter())
        .filter_map(|c| c.retained_from)
        .max()
        .unwrap_or(1)
}

/// What shredding up to an epoch does (or would do).
#[derive(Debug)]
pub struct Plan {
    /// Epochs before this one are shredded.
    pub before_epoch: u32,
    /// Files removed (segments and wraps), and the records in the segments.
    pub files: Vec<PathBuf>,
    pub epochs: (u32, u32),
    pub records: u64,
}

/// The first epoch to keep so that every epoch whose signed final checkpoint is older than
/// `cutoff_ms` goes; the open epoch is always kept.
pub fn epoch_for_age(dir: &Path, root: &PublicKey, cutoff_ms: u64) -> Result<u32, String> {
    let epochs = checkpoint::walk(dir, root, |_| {}).map_err(|e| e.to_string())?;
    Ok(epochs
        .iter()
        .filter_map(|e| e.final_checkpoint())
        .filter(|c| c.time_ms < cutoff_ms)
        .filter_map(|c| c.next_epoch)
        .max()
        .unwrap_or(1))
}

/// Verifies the whole log (integrity, with the root key) and says what shredding before
/// `before_epoch` would remove. An invalid log is never shredded: that would destroy evidence.
pub fn plan(dir: &Path, root: &PublicKey, before_epoch: u32) -> Result<Plan, String> {
    let material = verify::Material {
        root,
        read: None,
        anchors: &[],
    };
    let v = verify::verify(dir, &material, |_, _| {}).map_err(|e| format!("not shredding: {e}"))?;
    if before_epoch <= v.first_epoch {
        return Err(format!(
            "nothing to shred: the log already starts at epoch {}",
            v.first_epoch
        ));
    }
    if before_epoch > v.open_epoch {
        return Err(format!(
            "epoch {before_epoch} does not exist yet (the newest is {}); the open epoch is never shredded",
            v.open_epoch
        ));
    }
    let epochs = checkpoint::walk(dir, root, |_| {}).map_err(|e| e.to_string())?;
    let kept_from = epochs
        .iter()
        .find(|e| e.epoch == before_epoch)
        .map(|e| e.start.0)
        .ok_or("epoch order")?;
    let mut files = Vec::new();
    // From epoch 1: a shredding interrupted by a crash may have left a wrapped key behind.
    for e in 1..before_epoch {
        for name in [segment::segment_name(e), recipient::wrap_name(e)] {
            let path = dir.join(name);
            if securerun_models::fsutil::exists_no_follow(&path) {
                files.push(path);
            }
        }
    }
    Ok(Plan {
        before_epoch,
        files,
        epochs: (v.first_epoch, before_epoch - 1),
        records: kept_from.saturating_sub(v.first_seq),
    })
}

/// Carries out `plan` once its `audit_shredded` record and the writer's signed statement
/// (`retained_from`) are durable: wrap files are overwritten in place before they are removed,
/// then the segments go.
pub fn execute(dir: &Path, plan: &Plan) -> Result<(), String> {
    for path in &plan.files {
        super::keys::erase_file(path).map_err(|e| e.to_string())?;
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    super::keys::sync_dir(&dir.join("."));
    Ok(())
}
