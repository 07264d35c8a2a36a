//! Reading and verifying the log.
//!
//! With the read key (epoch 0's, or a later one after retention shredded older epochs) every
//! record is decrypted and authenticated. Detected: a modified byte (authentication fails), a
//! deleted, inserted, duplicated or reordered record (sequence or chain mismatch: the AEAD binds
//! the previous head), a record re-sealed with a later epoch's key (it must open under its own
//! segment's epoch key, which only the read key derives), a missing or renamed segment (epochs
//! run on without a gap from the read key's epoch), missing newest segments (the host's current
//! epoch is ahead of the last segment), a torn tail not acknowledged by the next epoch, and a
//! checkpoint that is forged, edited, missing for an epoch, disagrees with the chain, or
//! attests records that are no longer there (records cut off the end).
//!
//! With only the public root (`audit.pub`), nothing is decrypted: the chain of ciphertexts,
//! sequence numbers and epochs is checked against the signed checkpoints, and records after the
//! last checkpoint are reported as not yet attested.

use std::collections::BTreeMap;
use std::path::Path;

use super::checkpoint::{self, Checkpoint, KeySource};
use super::keys::{self, EpochKey};
use super::segment;
use super::AuditRecord;
use crate::signing::PublicKey;

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

/// What the verifier holds.
pub enum Access {
    /// A read key: decrypt and authenticate every record from its epoch on.
    Read(EpochKey),
    /// Only epoch 0's checkpoint public key: integrity against the signed checkpoints.
    Integrity(PublicKey),
}

/// A verified log.
#[derive(Debug, Default)]
pub struct Verified {
    /// Decrypted records (empty with [`Access::Integrity`]).
    pub records: Vec<(u64, AuditRecord)>,
    /// Records checked (decrypted or, in integrity mode, chained).
    pub count: u64,
    /// Sequence number of the last record and the chain head after it.
    pub last_seq: u64,
    pub head: [u8; 32],
    /// Records before the first one verified (shredded by retention).
    pub first_seq: u64,
    /// The first epoch verified (earlier epochs were shredded).
    pub first_epoch: u32,
    pub segments: usize,
    /// Checkpoints whose signatures and heads were checked; the last record they attest.
    pub checkpoints: usize,
    pub attested_seq: u64,
    /// Torn tails found (each acknowledged by the following epoch's first record).
    pub torn: Vec<String>,
}

/// Verifies every segment in `dir` with the read key `key`.
pub fn verify(dir: &Path, key: &EpochKey) -> Result<Verified, VerifyError> {
    verify_with(dir, &Access::Read(key.clone()), None)
}

/// Verifies with what the caller holds; `anchor` is a `(seq, head)` kept from an earlier
/// verification, which the log must still contain.
pub fn verify_with(
    dir: &Path,
    access: &Access,
    anchor: Option<(u64, [u8; 32])>,
) -> Result<Verified, VerifyError> {
    let all =
        segment::list_segments(dir).map_err(|e| bad(dir.display().to_string(), e.to_string()))?;
    let cps = checkpoint::read(dir).map_err(|e| bad(checkpoint::CHECKPOINTS, e))?;
    let source = match access {
        Access::Read(k) => KeySource::ReadKey(k.clone()),
        Access::Integrity(root) => KeySource::Root(root.clone()),
    };
    let newest = all.last().map_or(0, |(e, _)| *e);
    let authentic = checkpoint::authenticate(&cps.list, &source, newest.saturating_add(1))
        .map_err(|e| bad(checkpoint::CHECKPOINTS, e))?;
    let handed_over: std::collections::BTreeSet<u32> =
        cps.list.iter().filter_map(|c| c.next_epoch).collect();

    // Where verification starts: epoch 1, or the read key's epoch after retention; with the
    // public root, the oldest segment still present.
    let first_epoch = match access {
        Access::Read(k) => k.epoch.max(1),
        Access::Integrity(_) => all.first().map_or(1, |(e, _)| *e),
    };
    let segments: Vec<_> = all.iter().filter(|(e, _)| *e >= first_epoch).collect();
    let (start_seq, start_head) = if first_epoch <= 1 {
        (0, [0u8; 32])
    } else {
        if segments.first().map(|(e, _)| *e) != Some(first_epoch) {
            return Err(bad(
                segment::segment_name(first_epoch),
                "the first retained segment is missing",
            ));
        }
        // The state the retained epoch began from, as its handover states it (the first
        // record's authentication, or the handover's signature, confirms it).
        checkpoint::start_of(&cps.list, first_epoch).ok_or_else(|| {
            bad(
                checkpoint::CHECKPOINTS,
                format!("no handover to epoch {first_epoch}, where the log now starts"),
            )
        })?
    };

    let mut v = Verified {
        first_seq: start_seq,
        first_epoch,
        last_seq: start_seq,
        head: start_head,
        ..Default::default()
    };
    // Checkpoints to compare with the chain, by the record they attest.
    let mut expect: BTreeMap<u64, Vec<(usize, [u8; 32])>> = BTreeMap::new();
    for (i, c) in cps.list.iter().enumerate() {
        if authentic[i] && c.seq >= start_seq {
            expect
                .entry(c.seq)
                .or_default()
                .push((i + 1, parse_head(c)?));
            v.checkpoints += 1;
            v.attested_seq = v.attested_seq.max(c.seq);
        }
    }
    // The anchor is checked like a checkpoint (numbered 0).
    if let Some((seq, head)) = anchor {
        if seq < start_seq {
            return Err(bad(
                "anchor",
                format!("record {seq} is before the retained records (from {start_seq})"),
            ));
        }
        expect.entry(seq).or_default().push((0, head));
    }
    let mut check_checkpoints = |seq: u64, head: &[u8; 32]| -> Result<(), VerifyError> {
        for (n, h) in expect.remove(&seq).unwrap_or_default() {
            if &h != head {
                let place = if n == 0 {
                    "anchor".to_string()
                } else {
                    format!("checkpoint {n}")
                };
                return Err(bad(
                    place,
                    format!(
                        "it attests a different chain head at record {seq} (the log was rewritten)"
                    ),
                ));
            }
        }
        Ok(())
    };
    check_checkpoints(start_seq, &start_head)?;

    let mut pending_torn: Option<String> = None;
    let mut epoch_key = match access {
        Access::Read(k) => Some(k.advance_to(first_epoch).ok_or_else(|| {
            bad(
                segment::segment_name(first_epoch),
                "epoch precedes the read key",
            )
        })?),
        Access::Integrity(_) => None,
    };
    for (i, (epoch, path)) in segments.iter().enumerate() {
        let name = segment::segment_name(*epoch);
        if *epoch != first_epoch + i as u32 {
            return Err(bad(
                &name,
                format!(
                    "expected segment of epoch {}: a segment is missing or renamed",
                    first_epoch + i as u32
                ),
            ));
        }
        if !handed_over.contains(epoch) {
            return Err(bad(
                &name,
                format!("no checkpoint hands over to epoch {epoch} (checkpoints were removed)"),
            ));
        }
        // Epochs are consecutive from here, so the key moves forward one step per segment.
        if let Some(k) = epoch_key.as_mut() {
            if k.epoch < *epoch {
                *k = k.next();
            }
            if k.epoch != *epoch {
                return Err(bad(&name, "epoch precedes the read key"));
            }
        }
        let record_key = epoch_key.as_ref().map(EpochKey::record_key);
        let contents = segment::read(path).map_err(|e| bad(&name, e.to_string()))?;
        for (j, frame) in contents.frames.iter().enumerate() {
            let expected_seq = v.last_seq + 1;
            let place = format!("{name} offset {} (record {expected_seq})", frame.offset);
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
            if let Some(record_key) = &record_key {
                let plain = frame.open(record_key, &v.head).ok_or_else(|| {
                    bad(
                        &place,
                        "authentication failed (modified, moved, or sealed with another epoch's key)",
                    )
                })?;
                let record: AuditRecord = serde_json::from_slice(&plain).map_err(|e| {
                    bad(&place, format!("sealed record is not a valid record: {e}"))
                })?;
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
                v.records.push((frame.seq, record));
            } else if j == 0 {
                if let Some(t) = pending_torn.take() {
                    v.torn.push(t);
                }
            }
            v.head = segment::chain(&v.head, &frame.body);
            v.last_seq = frame.seq;
            v.count += 1;
            check_checkpoints(frame.seq, &v.head)?;
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
        let newest = segments.last().map_or(0, |(e, _)| *e);
        if current.epoch > newest {
            return Err(bad(
                keys::CURRENT_KEY,
                format!(
                    "the log is at epoch {} but the newest segment is epoch {newest}: the newest were removed",
                    current.epoch
                ),
            ));
        }
    }
    // Checkpoints left over attest records past the end: they were cut off.
    if let Some((seq, list)) = expect.iter().next() {
        let place = match list[0].0 {
            0 => "anchor".to_string(),
            n => format!("checkpoint {n}"),
        };
        return Err(bad(
            place,
            format!(
                "it attests record {seq}, but the log ends at record {}: records were cut off the end",
                v.last_seq
            ),
        ));
    }
    Ok(v)
}

fn parse_head(c: &Checkpoint) -> Result<[u8; 32], VerifyError> {
    hex::decode(&c.head)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            bad(
                checkpoint::CHECKPOINTS,
                format!(
                    "checkpoint at record {}: head is not 32 bytes of hex",
                    c.seq
                ),
            )
        })
}
