//! Reading and verifying the whole log with the epoch-0 key.
//!
//! Detected: a modified byte (authentication fails), a deleted, inserted, duplicated or
//! reordered record (sequence or chain mismatch: the AEAD binds the previous head), a record
//! re-sealed with a later epoch's key (it must open under its own segment's epoch key, which
//! only the epoch-0 key derives), a missing or renamed segment (epochs must run 1, 2, 3, ...),
//! missing newest segments (the host's current epoch is ahead of the last segment), and a torn
//! tail not acknowledged by the next epoch. Not detectable without an outside anchor: cutting
//! whole records off the end of the newest segment; `verify` prints the head (count and hash) so
//! an operator can keep it elsewhere and pass it back with `--anchor`.

use std::path::Path;

use super::keys::{self, EpochKey};
use super::segment;
use super::AuditRecord;

/// The first problem found, and where.
#[derive(Debug, thiserror::Error)]
#[error("audit log invalid at {place}: {reason}")]
pub struct VerifyError {
    pub place: String,
    pub reason: String,
}

fn bad(place: impl Into<String>, reason: impl Into<String>) -> VerifyError {
    VerifyError {
        place: place.into(),
        reason: reason.into(),
    }
}

/// A verified log.
#[derive(Debug, Default)]
pub struct Verified {
    pub records: Vec<(u64, AuditRecord)>,
    pub head: [u8; 32],
    pub segments: usize,
    /// Torn tails found (each acknowledged by the following epoch's first record).
    pub torn: Vec<String>,
}

/// Verifies every segment in `dir` with the epoch-0 key `k0`.
pub fn verify(dir: &Path, k0: &EpochKey) -> Result<Verified, VerifyError> {
    let segments =
        segment::list_segments(dir).map_err(|e| bad(dir.display().to_string(), e.to_string()))?;
    let mut v = Verified::default();
    let mut expected_seq = 1u64;
    let mut pending_torn: Option<String> = None;
    for (i, (epoch, path)) in segments.iter().enumerate() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if *epoch != i as u32 + 1 {
            return Err(bad(
                &name,
                format!(
                    "expected segment of epoch {}: a segment is missing or renamed",
                    i + 1
                ),
            ));
        }
        let key = k0
            .advance_to(*epoch)
            .ok_or_else(|| bad(&name, "epoch precedes the read key"))?;
        let record_key = key.record_key();
        let contents = segment::read(path).map_err(|e| bad(&name, e.to_string()))?;
        for (j, frame) in contents.frames.iter().enumerate() {
            let place = format!("{name} offset {} (record {})", frame.offset, expected_seq);
            if frame.seq != expected_seq {
                return Err(bad(
                    place,
                    format!(
                        "sequence number {} (a record was deleted, inserted or reordered)",
                        frame.seq
                    ),
                ));
            }
            if frame.epoch != *epoch {
                return Err(bad(
                    place,
                    format!("record claims epoch {} inside segment {epoch}", frame.epoch),
                ));
            }
            let plain = frame.open(&record_key, &v.head).ok_or_else(|| {
                bad(
                    &place,
                    "authentication failed (modified, moved, or sealed with another epoch's key)",
                )
            })?;
            let record: AuditRecord = serde_json::from_slice(&plain)
                .map_err(|e| bad(&place, format!("sealed record is not a valid record: {e}")))?;
            if j == 0 {
                if let Some(t) = pending_torn.take() {
                    if record.outcome.as_deref() != Some("torn_tail_found") {
                        return Err(bad(
                            &place,
                            format!("{t}, and the next epoch does not acknowledge it"),
                        ));
                    }
                    v.torn.push(t);
                }
            }
            v.head = segment::chain(&v.head, &frame.body);
            v.records.push((frame.seq, record));
            expected_seq += 1;
        }
        if let Some(at) = contents.torn_at {
            pending_torn = Some(format!("{name} ends in an incomplete record at byte {at}"));
        }
        v.segments += 1;
    }
    if let Some(t) = pending_torn {
        // The newest segment is torn: a crash; reported, the complete records stand.
        v.torn.push(t);
    }
    // The host's current epoch must be the newest segment's, else newer segments were removed.
    if let Ok(current) = EpochKey::load(&dir.join(keys::CURRENT_KEY)) {
        if current.epoch as usize > v.segments {
            return Err(bad(
                keys::CURRENT_KEY,
                format!(
                    "the log is at epoch {} but only {} segments exist: the newest were removed",
                    current.epoch, v.segments
                ),
            ));
        }
    }
    Ok(v)
}

/// The chain head (hex) right after record `seq`, for anchors.
pub fn head_at(dir: &Path, seq: u64) -> Result<String, VerifyError> {
    let mut head = [0u8; 32];
    for (_, path) in
        segment::list_segments(dir).map_err(|e| bad(dir.display().to_string(), e.to_string()))?
    {
        let contents =
            segment::read(&path).map_err(|e| bad(path.display().to_string(), e.to_string()))?;
        for f in &contents.frames {
            head = segment::chain(&head, &f.body);
            if f.seq == seq {
                return Ok(hex::encode(head));
            }
        }
    }
    Err(bad("anchor", format!("record {seq} not found")))
}
