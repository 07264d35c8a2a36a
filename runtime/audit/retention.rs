//! Retention by crypto-shredding.
//!
//! Every epoch's key derives from the one before it and never the other way, so replacing the
//! read key `K(r)` by `K(N)` makes epochs r..N-1 unreadable for good — on this host, in every
//! backup, anywhere their ciphertext was copied — once every copy of the old read key is gone.
//! Their segment files are then deleted here too. The checkpoints stay (they hold counts and
//! hashes, no personal data), so the retained log still verifies from where it now starts.

use std::path::Path;

use super::checkpoint;
use super::keys::EpochKey;
use super::segment;
use super::verify;

/// What shredding up to an epoch does (or would do).
#[derive(Debug)]
pub struct Plan {
    /// Epochs before this one are shredded; the new read key is this epoch's.
    pub before_epoch: u32,
    /// Segment files removed, and the records in them.
    pub segments: Vec<(u32, std::path::PathBuf)>,
    pub records: u64,
}

/// Picks the first epoch to keep: every epoch that ended before `cutoff_ms` is shredded. An
/// epoch ends where the handover to the next begins; the newest epoch is always kept.
pub fn epoch_for_age(dir: &Path, cutoff_ms: u64) -> Result<u32, String> {
    let cps = checkpoint::read(dir)?;
    let newest = segment::list_segments(dir)
        .map_err(|e| e.to_string())?
        .last()
        .map_or(1, |(e, _)| *e);
    Ok(cps
        .list
        .iter()
        .filter(|c| c.time_ms < cutoff_ms)
        .filter_map(|c| c.next_epoch)
        .filter(|e| *e <= newest)
        .max()
        .unwrap_or(1))
}

/// Checks that the log verifies with `key` and that shredding before `before_epoch` is
/// possible; returns what would go. An invalid log is never shredded: that would destroy
/// the evidence.
pub fn plan(dir: &Path, key: &EpochKey, before_epoch: u32) -> Result<Plan, String> {
    let v = verify::verify(dir, key).map_err(|e| format!("not shredding: {e}"))?;
    let segments = segment::list_segments(dir).map_err(|e| e.to_string())?;
    let newest = segments.last().map_or(0, |(e, _)| *e);
    if before_epoch <= key.epoch.max(1) {
        return Err(format!(
            "nothing to shred: the read key already starts at epoch {}",
            key.epoch.max(1)
        ));
    }
    if before_epoch > newest {
        return Err(format!(
            "epoch {before_epoch} does not exist (the newest is {newest}); the current epoch is never shredded"
        ));
    }
    // The log as it will be must verify from its new start, or nothing is done.
    let new_key = key.advance_to(before_epoch).ok_or("epoch order")?;
    let kept = verify::verify(dir, &new_key)
        .map_err(|e| format!("not shredding: the retained log would not verify: {e}"))?;
    Ok(Plan {
        before_epoch,
        segments: segments
            .into_iter()
            .filter(|(e, _)| *e < before_epoch)
            .collect(),
        records: v.count.saturating_sub(kept.count),
    })
}

/// Carries out `plan`: writes the new read key to `key_path` (replacing the old one, which is
/// the actual shredding), then deletes the shredded segments.
pub fn execute(dir: &Path, key: &EpochKey, key_path: &Path, plan: &Plan) -> Result<(), String> {
    let new_key = key
        .advance_to(plan.before_epoch)
        .ok_or("the read key is newer than the retention point")?;
    new_key.store(key_path).map_err(|e| e.to_string())?;
    for (_, path) in &plan.segments {
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // The directory entry removals must reach the disk with the key replacement.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
