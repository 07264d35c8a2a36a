//! Verifying the log with off-host material: the root public key (`audit.pub`), optionally
//! the read key (to decrypt) and anchors (signed heads kept elsewhere).
//!
//! With the root alone, nothing is decrypted: the signed checkpoints are walked from the
//! genesis handover (every signature checked, each epoch's key learned from the one before),
//! and every segment's chain of ciphertexts is compared with them. Detected: a changed,
//! deleted, inserted, duplicated or reordered record anywhere a checkpoint covers; a closed
//! epoch without its final checkpoint, or with records after it; a missing segment; files of
//! an epoch the log never handed over to; planted or renamed files; a torn tail anywhere but
//! at the very end. With a read key, every record is also decrypted and authenticated, and
//! each epoch's record key is checked against the commitment its handover signed.
//!
//! What no verifier can see without help: records after the newest signed head, or whole
//! newest epochs removed together with their handover. An anchor — a signed head from the
//! checkpoint sink, `audit anchor`, or any later checkpoint kept off the host — closes that
//! gap up to the anchor; [`Verified`] says how far the guarantee reaches.

use std::collections::BTreeMap;
use std::path::Path;

use super::checkpoint::{self, problem, Checkpoint, Epoch, Problem};
use super::recipient::{self, ReadKey, Wrapped};
use super::segment::{self, Kind, Listing};
use super::AuditRecord;
use crate::signing::PublicKey;

/// What the verifier holds besides the log.
pub struct Material<'a> {
    pub root: &'a PublicKey,
    pub read: Option<&'a ReadKey>,
    pub anchors: &'a [Checkpoint],
}

/// A verified log.
#[derive(Debug, Default)]
pub struct Verified {
    /// Decrypted records (empty without a read key).
    pub records: Vec<(u64, AuditRecord)>,
    /// Records checked (decrypted, or chained).
    pub count: u64,
    /// Sequence number of the last record and the chain head after it.
    pub last_seq: u64,
    pub head: [u8; 32],
    /// Records before the first one present (shredded by retention).
    pub first_seq: u64,
    /// The first epoch present (earlier ones were shredded).
    pub first_epoch: u32,
    /// The newest (open) epoch.
    pub open_epoch: u32,
    pub segments: usize,
    pub checkpoints: usize,
    pub anchors: usize,
    /// The newest record a signed head (checkpoint or anchor) covers, and that head's time.
    pub attested_seq: u64,
    pub attested_time_ms: Option<u64>,
    /// Whether an anchor reached the newest signed head on the host (or beyond).
    pub anchored: bool,
    /// Notes: a torn tail at the very end (a crash), shredded epochs.
    pub notes: Vec<String>,
}

/// Verifies everything in `dir`; `progress` is told each epoch as it starts.
pub fn verify(
    dir: &Path,
    material: &Material,
    mut progress: impl FnMut(u32, u32),
) -> Result<Verified, Problem> {
    let epochs = checkpoint::walk(dir, material.root, |_| {})?;
    let open = epochs.last().expect("the walk yields epoch 0 at least");
    let listing =
        Listing::of(dir).map_err(|e| problem(dir.display().to_string(), e.to_string()))?;
    if let Some(name) = listing.unknown.first() {
        return Err(problem(
            name,
            "a file named like the log's but not in the writer's form, or not a regular file (planted or renamed)",
        ));
    }
    // A wrap for the next epoch alone is an interrupted handover (the writer replaces it).
    let beyond =
        |(e, kind): &(u32, Kind)| *e > open.epoch && !(*kind == Kind::Wrap && *e == open.epoch + 1);
    if let Some(((e, kind), _)) = listing.files.iter().find(|(k, _)| beyond(k)) {
        return Err(problem(
            kind.name(*e),
            format!(
                "epoch {} has no final checkpoint, yet files of epoch {e} exist: a final checkpoint was removed",
                open.epoch
            ),
        ));
    }
    // Anchors: each must be a signed head of this log.
    let mut anchors: BTreeMap<u32, Vec<(usize, &Checkpoint)>> = BTreeMap::new();
    for (i, a) in material.anchors.iter().enumerate() {
        let place = format!("anchor {}", i + 1);
        if a.epoch > open.epoch {
            return Err(problem(
                place,
                format!(
                    "a signed head of epoch {} (record {}), but the log ends in epoch {}: its newest epochs were removed (or the anchor is another log's)",
                    a.epoch, a.seq, open.epoch
                ),
            ));
        }
        if checkpoint::authenticate(&epochs, a).is_none() {
            return Err(problem(place, "not signed by this log's key for its epoch"));
        }
        anchors.entry(a.epoch).or_default().push((i + 1, a));
    }

    let first_epoch = listing
        .segments()
        .map(|(e, _)| e)
        .next()
        .ok_or_else(|| problem(dir.display().to_string(), "no segment files"))?;
    let start = epochs
        .iter()
        .find(|e| e.epoch == first_epoch)
        .map(|e| e.start)
        .expect("segments beyond the open epoch were refused above");
    let mut v = Verified {
        first_seq: start.0,
        first_epoch,
        open_epoch: open.epoch,
        last_seq: start.0,
        head: start.1,
        ..Default::default()
    };
    if first_epoch > 1 {
        // Old segments may be missing only where a signed checkpoint said retention could
        // remove them; anything else is deletion.
        let retained = super::retention::retained_from(&epochs);
        if retained < first_epoch {
            return Err(problem(
                segment::segment_name(first_epoch - 1),
                format!(
                    "segments of epochs {retained}..{} are missing and no signed checkpoint records their shredding (deleted)",
                    first_epoch - 1
                ),
            ));
        }
        v.notes.push(format!(
            "epochs 1..{} are absent (records 1..{}): shredded by retention",
            first_epoch - 1,
            start.0
        ));
    }
    for e in epochs.iter().filter(|e| e.epoch >= first_epoch) {
        progress(e.epoch, open.epoch);
        let here = anchors.remove(&e.epoch).unwrap_or_default();
        verify_epoch(
            dir,
            &listing,
            e,
            e.epoch == open.epoch,
            material.read,
            &here,
            &mut v,
        )?;
    }
    // Anchors left are of shredded epochs: nothing remains to compare them with.
    let skipped: usize = anchors.values().map(Vec::len).sum();
    if skipped > 0 {
        v.notes.push(format!(
            "{skipped} anchors are heads of shredded epochs and were skipped"
        ));
    }
    let (newest_signed, _, _) = open.last_head();
    v.anchored =
        !material.anchors.is_empty() && material.anchors.iter().any(|a| a.seq >= newest_signed);
    Ok(v)
}

/// One epoch: its segment against its checkpoints (and anchors), decrypted with a read key.
fn verify_epoch(
    dir: &Path,
    listing: &Listing,
    e: &Epoch,
    is_open: bool,
    read: Option<&ReadKey>,
    anchors: &[(usize, &Checkpoint)],
    v: &mut Verified,
) -> Result<(), Problem> {
    let name = segment::segment_name(e.epoch);
    let path = listing
        .get(e.epoch, Kind::Segment)
        .ok_or_else(|| problem(&name, "the segment is missing (deleted)"))?;
    if (v.last_seq, v.head) != e.start {
        return Err(problem(
            &name,
            "the epoch's handover says it began elsewhere than the previous segment ended",
        ));
    }
    let cipher = match read {
        Some(k) => Some(segment::cipher(epoch_record_key(dir, k, e)?.expose())),
        None => None,
    };
    // Signed heads to meet: (seq → [(place, head)]).
    let mut expect: BTreeMap<u64, Vec<(String, [u8; 32])>> = BTreeMap::new();
    for (i, c) in e.checkpoints.iter().enumerate() {
        let place = format!("{} line {}", Kind::Checkpoints.name(e.epoch), i + 1);
        expect
            .entry(c.seq)
            .or_default()
            .push((place, c.head_bytes().expect("checked by the walk")));
        v.checkpoints += 1;
        if c.seq >= v.attested_seq {
            v.attested_seq = c.seq;
            v.attested_time_ms = Some(c.time_ms);
        }
    }
    for (n, a) in anchors {
        let head = a
            .head_bytes()
            .ok_or_else(|| problem(format!("anchor {n}"), "malformed head"))?;
        expect
            .entry(a.seq)
            .or_default()
            .push((format!("anchor {n}"), head));
        v.anchors += 1;
        if a.seq >= v.attested_seq {
            v.attested_seq = a.seq;
            v.attested_time_ms = Some(a.time_ms);
        }
    }
    let mut meet = |seq: u64, head: &[u8; 32]| -> Result<(), Problem> {
        for (place, h) in expect.remove(&seq).unwrap_or_default() {
            if &h != head {
                return Err(problem(
                    place,
                    format!(
                        "it attests a different chain head at record {seq} (the log was rewritten)"
                    ),
                ));
            }
        }
        Ok(())
    };
    meet(v.last_seq, &v.head.clone())?;
    let mut reader = segment::Reader::open(path).map_err(|err| problem(&name, err.to_string()))?;
    loop {
        let frame = match reader
            .next_frame()
            .map_err(|err| problem(&name, err.to_string()))?
        {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(t) => {
                let what = format!("{name} ends in an incomplete record at byte {}", t.offset);
                if !is_open {
                    return Err(problem(
                        format!("{name} offset {}", t.offset),
                        "bytes that are not records inside a closed epoch",
                    ));
                }
                v.notes.push(format!(
                    "{what} (a crash during a write; every complete record before it verified)"
                ));
                break;
            }
        };
        let expected_seq = v
            .last_seq
            .checked_add(1)
            .ok_or_else(|| problem(&name, "record count overflows"))?;
        let place = format!("{name} offset {} (record {expected_seq})", frame.offset);
        if frame.seq != expected_seq {
            return Err(problem(
                place,
                format!(
                    "sequence number {} (a record was deleted, inserted or reordered)",
                    frame.seq
                ),
            ));
        }
        if frame.epoch != e.epoch {
            return Err(problem(
                place,
                format!(
                    "record claims epoch {} inside segment {}",
                    frame.epoch, e.epoch
                ),
            ));
        }
        if let Some(cipher) = &cipher {
            let plain = frame.open(cipher, &v.head).ok_or_else(|| {
                problem(
                    &place,
                    "authentication failed (modified, moved, or sealed with another epoch's key)",
                )
            })?;
            let record: AuditRecord = serde_json::from_slice(&plain).map_err(|err| {
                problem(
                    &place,
                    format!("sealed record is not a valid record: {err}"),
                )
            })?;
            v.records.push((frame.seq, record));
        }
        v.head = segment::chain(&v.head, &frame.body);
        v.last_seq = frame.seq;
        v.count += 1;
        meet(v.last_seq, &v.head.clone())?;
    }
    if let Some(f) = e.final_checkpoint() {
        if v.last_seq != f.seq {
            return Err(problem(
                &name,
                format!(
                    "the epoch's final checkpoint closes it at record {}, but the segment ends at record {} (records were {})",
                    f.seq,
                    v.last_seq,
                    if v.last_seq > f.seq { "added after it closed" } else { "cut off the end" }
                ),
            ));
        }
    }
    if let Some((seq, list)) = expect.into_iter().next() {
        return Err(problem(
            &list[0].0,
            format!(
                "it attests record {seq}, but {name} ends at record {}: records were cut off the end",
                v.last_seq
            ),
        ));
    }
    v.segments += 1;
    Ok(())
}

/// Epoch `e`'s record key, unwrapped with the read key and checked against the commitment
/// its handover signed (so a swapped wrap file cannot make forged records readable).
fn epoch_record_key(
    dir: &Path,
    read: &ReadKey,
    e: &Epoch,
) -> Result<super::secret::Secret, Problem> {
    let name = recipient::wrap_name(e.epoch);
    let wrapped = Wrapped::read(&dir.join(&name)).map_err(|err| problem(&name, err))?;
    let key = read
        .unwrap(&wrapped, e.epoch)
        .map_err(|err| problem(&name, err))?;
    if e.commit.as_deref() != Some(super::keys::record_commitment(key.expose()).as_str()) {
        return Err(problem(
            &name,
            "the key does not match the commitment the epoch's handover signed (replaced)",
        ));
    }
    Ok(key)
}

/// Reads anchors: one signed head per line, possibly inside a syslog or journal line;
/// lines without a checkpoint are skipped, a checkpoint that does not parse is an error.
pub fn read_anchors(path: &Path) -> Result<Vec<Checkpoint>, String> {
    let bytes =
        securerun_models::fsutil::read_bounded(path, 256 << 20).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&bytes);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if !line.contains("\"sig\"") {
            continue;
        }
        out.push(
            Checkpoint::from_line(line)
                .ok_or_else(|| format!("{} line {}: not a signed head", path.display(), i + 1))?,
        );
    }
    if out.is_empty() {
        return Err(format!("{}: no signed heads", path.display()));
    }
    Ok(out)
}
