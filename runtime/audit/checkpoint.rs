//! Signed checkpoints and the chain of epoch signing keys.
//!
//! A checkpoint is a signed head: `(epoch, record count, chain head, time)`, signed with a
//! one-time ECDSA P-256 key (fresh random, see [`super::keys`]) and naming the public key that
//! signs the next checkpoint; the key that signed is then erased. So keys form a chain from the
//! root, and whoever copies the host at time T holds only the key of the *next* checkpoint:
//! every checkpoint already written stays beyond their reach, in the current epoch too. Epoch
//! E's checkpoints are appended to `cp-EEEEEEEE.jsonl`. Its last one is its *final* checkpoint,
//! which is also the handover: it names the next epoch, that epoch's first signing key and a
//! commitment to its record key. Epoch 0 has no records: `cp-00000000.jsonl` holds only
//! the genesis handover, signed by the root key whose public half is `audit.pub`, and that
//! root secret is dropped as soon as it has signed.
//!
//! So a verifier needs `audit.pub` and nothing secret: it walks the handovers from the root
//! and learns each epoch's public key from a signature it has already checked. A read key
//! decrypts and cannot sign anything. A closed epoch without a final checkpoint, a checkpoint
//! file after an epoch that never handed over, and any line that does not verify are errors.
//!
//! When: the handover at every epoch start, a checkpoint after every [`EVERY_RECORDS`] records
//! or [`EVERY`] of activity, and when the writer stops. Each is also sent to the configured
//! sinks ([`super::sink`]) so the newest signed head lives off the host.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keys::EpochSecrets;
use super::segment::{self, Kind};
use super::AuditError;
use crate::signing::PublicKey;

/// The root public key: the only thing an auditor must trust.
pub const ROOT_PUB: &str = "audit.pub";
/// A checkpoint after this many records...
pub const EVERY_RECORDS: u64 = 1000;
/// ...or this long after the previous one, whichever comes first (if anything was written).
pub const EVERY: Duration = Duration::from_secs(60);
/// Largest per-epoch checkpoints file read (a line is about 300 bytes; an epoch ends at
/// 64 MiB of records, so at most a few hundred lines).
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// One signed statement about the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub v: u32,
    /// The epoch whose key signed this.
    pub epoch: u32,
    /// Records in the log so far (the sequence number of the last one).
    pub seq: u64,
    /// Chain head (hex) after record `seq`.
    pub head: String,
    pub time_ms: u64,
    /// The public key (SPKI PEM) that signs the next checkpoint.
    pub next_key: String,
    /// Final checkpoint only: the epoch that starts now, and the commitment to its record key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_epoch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_commit: Option<String>,
    /// Retention: epochs before this one may be gone (shredded). Signed by the writer when it
    /// records the shredding, so removing old segments without it is detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_from: Option<u32>,
    /// Base64 DER ECDSA P-256/SHA-256 signature over [`Checkpoint::message`].
    pub sig: String,
}

impl Checkpoint {
    /// A checkpoint of `(seq, head)` signed by `key`, naming `next`'s signing key. If `next`
    /// is the following epoch's, this is `key`'s epoch's final checkpoint, handing over to it.
    pub fn sign(
        key: &EpochSecrets,
        seq: u64,
        head: &[u8; 32],
        next: &EpochSecrets,
    ) -> Result<Checkpoint, AuditError> {
        Self::sign_retaining(key, seq, head, next, None)
    }

    /// [`Self::sign`], stating that epochs before `retained_from` may have been shredded.
    pub fn sign_retaining(
        key: &EpochSecrets,
        seq: u64,
        head: &[u8; 32],
        next: &EpochSecrets,
        retained_from: Option<u32>,
    ) -> Result<Checkpoint, AuditError> {
        let next_key = next
            .public_key()
            .to_pem()
            .map_err(|e| AuditError::Key(e.to_string()))?;
        let handover = next.epoch != key.epoch;
        let mut c = Checkpoint {
            v: 2,
            epoch: key.epoch,
            seq,
            head: hex::encode(head),
            time_ms: super::now_ms(),
            next_key,
            next_epoch: handover.then_some(next.epoch),
            next_commit: handover.then(|| next.record_commitment()),
            retained_from,
            sig: String::new(),
        };
        c.sig = crate::signing::bundle::b64_encode(&key.sign(&c.message()));
        Ok(c)
    }

    /// The exact bytes signed: every field but the signature, unambiguously.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "securerun-audit-checkpoint v{}\nepoch {}\nseq {}\nhead {}\ntime_ms {}\nnext_epoch {}\nnext_key {}\nnext_commit {}\nretained_from {}\n",
            self.v,
            self.epoch,
            self.seq,
            self.head,
            self.time_ms,
            self.next_epoch.map_or("-".to_string(), |e| e.to_string()),
            // JSON-quoted: every string has exactly one encoding here.
            serde_json::to_string(&self.next_key).unwrap_or_default(),
            serde_json::to_string(&self.next_commit).unwrap_or_default(),
            self.retained_from.map_or("-".to_string(), |e| e.to_string()),
        )
        .into_bytes()
    }

    pub fn verify(&self, key: &PublicKey) -> bool {
        crate::signing::bundle::b64_decode(&self.sig)
            .map(|der| key.verify(&self.message(), &der))
            .unwrap_or(false)
    }

    pub fn is_final(&self) -> bool {
        self.next_epoch.is_some()
    }

    pub fn next_public_key(&self) -> Option<PublicKey> {
        PublicKey::from_pem(&self.next_key).ok()
    }

    pub fn head_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.head, &mut out).ok()?;
        Some(out)
    }

    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a checkpoint serializes");
        line.push('\n');
        line
    }

    /// Parses a checkpoint out of a line that may carry a prefix (a syslog or journal line
    /// kept as an anchor): the JSON object from the first `{` to the last `}`.
    pub fn from_line(line: &str) -> Option<Checkpoint> {
        let (start, end) = (line.find('{')?, line.rfind('}')?);
        serde_json::from_str(line.get(start..=end)?).ok()
    }
}

/// Opens (creating if `create`) an epoch's checkpoints file for appending.
pub fn open_for_append(dir: &Path, epoch: u32, create: bool) -> Result<std::fs::File, AuditError> {
    let path = dir.join(Kind::Checkpoints.name(epoch));
    let f = std::fs::OpenOptions::new()
        .append(true)
        .read(true)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
    if !f
        .metadata()
        .map_err(|e| AuditError::Io(e.to_string()))?
        .is_file()
    {
        return Err(AuditError::Io(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

/// Appends one checkpoint line and syncs it. A failed write is cut back so no partial line
/// stays behind.
pub fn append(f: &mut std::fs::File, c: &Checkpoint) -> Result<(), AuditError> {
    let io = |e: std::io::Error| AuditError::Io(format!("checkpoint: {e}"));
    let len = f.metadata().map_err(io)?.len();
    let written = f
        .write_all(c.to_line().as_bytes())
        .and_then(|_| f.sync_data());
    if let Err(e) = written {
        let _ = f.set_len(len);
        return Err(io(e));
    }
    Ok(())
}

/// An epoch's checkpoints file as read: complete lines parsed, and a torn last line (a crash
/// during a write) reported with the length of the complete part.
#[derive(Debug, Default)]
pub struct EpochFile {
    pub list: Vec<Checkpoint>,
    pub torn_at: Option<u64>,
}

/// Reads `cp-E.jsonl` (bounded, not following links); a missing file reads as empty; a
/// complete line that is not a checkpoint is an error naming it.
pub fn read_epoch(dir: &Path, epoch: u32) -> Result<EpochFile, String> {
    let name = Kind::Checkpoints.name(epoch);
    let bytes = match securerun_models::fsutil::read_bounded(&dir.join(&name), MAX_FILE) {
        Ok(b) => b,
        Err(securerun_models::fsutil::OpenError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(EpochFile::default())
        }
        Err(e) => return Err(format!("{name}: {e}")),
    };
    let mut out = EpochFile::default();
    let mut pos = 0usize;
    let mut line_no = 0;
    while pos < bytes.len() {
        line_no += 1;
        let Some(end) = bytes[pos..].iter().position(|&b| b == b'\n') else {
            out.torn_at = Some(pos as u64);
            break;
        };
        let c: Checkpoint = serde_json::from_slice(&bytes[pos..pos + end])
            .map_err(|e| format!("{name} line {line_no}: not a checkpoint: {e}"))?;
        out.list.push(c);
        pos += end + 1;
    }
    Ok(out)
}

/// Where a problem was found, and what it is.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit log invalid at {place}: {reason}")]
pub struct Problem {
    pub place: String,
    pub reason: String,
}

pub fn problem(place: impl Into<String>, reason: impl Into<String>) -> Problem {
    Problem {
        place: place.into(),
        reason: reason.into(),
    }
}

/// One epoch as the signed checkpoints describe it.
#[derive(Debug, Clone)]
pub struct Epoch {
    pub epoch: u32,
    /// Every key of the epoch's chain, in order: the handover's, then each checkpoint's
    /// `next_key`. The last one (unless the epoch is closed) signs its next checkpoint.
    pub keys: Vec<PublicKey>,
    /// Where the chain stood when the epoch began (from the previous epoch's final).
    pub start: (u64, [u8; 32]),
    /// The commitment to this epoch's record key (none for epoch 0).
    pub commit: Option<String>,
    /// Its checkpoints, every signature checked, in order; the last is final if it handed over.
    pub checkpoints: Vec<Checkpoint>,
    /// The checkpoints file ended in an incomplete line (the newest epoch only: a crash).
    pub torn_at: Option<u64>,
}

impl Epoch {
    /// The key that signs this epoch's next checkpoint (the open epoch's writer holds it).
    pub fn signer(&self) -> &PublicKey {
        self.keys.last().expect("an epoch has its handover's key")
    }

    pub fn final_checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoints.last().filter(|c| c.is_final())
    }

    /// The last signed head: `(seq, head, time)`.
    pub fn last_head(&self) -> (u64, [u8; 32], Option<u64>) {
        match self.checkpoints.last() {
            Some(c) => (c.seq, c.head_bytes().unwrap_or_default(), Some(c.time_ms)),
            None => (self.start.0, self.start.1, None),
        }
    }
}

/// Walks the checkpoint files from the root: epoch 0's genesis handover, then each epoch's
/// checkpoints under the key the previous final named, until an epoch without a final (the
/// open one). Every signature is checked; epochs are consecutive by construction.
/// `progress` is called once per epoch.
pub fn walk(
    dir: &Path,
    root: &PublicKey,
    mut progress: impl FnMut(u32),
) -> Result<Vec<Epoch>, Problem> {
    let mut epochs: Vec<Epoch> = Vec::new();
    let mut next = Some(Epoch {
        epoch: 0,
        keys: vec![root.clone()],
        start: (0, [0; 32]),
        commit: None,
        checkpoints: Vec::new(),
        torn_at: None,
    });
    while let Some(mut e) = next.take() {
        progress(e.epoch);
        let name = Kind::Checkpoints.name(e.epoch);
        let file = read_epoch(dir, e.epoch).map_err(|r| problem(&name, r))?;
        if e.epoch == 0 && file.list.is_empty() {
            return Err(problem(
                &name,
                "the genesis handover is missing (is this an audit directory?)",
            ));
        }
        let mut last_seq = e.start.0;
        for (i, c) in file.list.iter().enumerate() {
            let place = format!("{name} line {}", i + 1);
            if c.v != 2 || c.epoch != e.epoch {
                return Err(problem(
                    place,
                    format!(
                        "a checkpoint of epoch {} (v{}) in epoch {}'s file",
                        c.epoch, c.v, e.epoch
                    ),
                ));
            }
            if !c.verify(e.signer()) {
                return Err(problem(
                    place,
                    "the signature does not verify under the key the previous checkpoint named (forged, edited, or a checkpoint before it removed)",
                ));
            }
            let Some(next_key) = c.next_public_key() else {
                return Err(problem(place, "malformed next key"));
            };
            if c.seq < last_seq || c.head_bytes().is_none() {
                return Err(problem(
                    place,
                    "record count goes backwards or head is malformed",
                ));
            }
            last_seq = c.seq;
            if c.is_final() && i + 1 != file.list.len() {
                return Err(problem(
                    place,
                    "checkpoints follow the epoch's final checkpoint",
                ));
            }
            if e.epoch == 0 && !c.is_final() {
                return Err(problem(place, "epoch 0 holds only the genesis handover"));
            }
            e.keys.push(next_key);
        }
        e.checkpoints = file.list;
        e.torn_at = file.torn_at;
        if let Some(f) = e.final_checkpoint() {
            let place = format!("{name} line {}", e.checkpoints.len());
            let (Some(n), Some(key), Some(commit)) =
                (f.next_epoch, f.next_public_key(), f.next_commit.clone())
            else {
                return Err(problem(place, "malformed final checkpoint"));
            };
            if Some(n) != e.epoch.checked_add(1) {
                return Err(problem(place, format!("hands over to epoch {n}")));
            }
            if e.torn_at.is_some() {
                return Err(problem(
                    &name,
                    "an incomplete line before the final checkpoint",
                ));
            }
            next = Some(Epoch {
                epoch: n,
                keys: vec![key],
                start: (f.seq, f.head_bytes().expect("checked above")),
                commit: Some(commit),
                checkpoints: Vec::new(),
                torn_at: None,
            });
        }
        epochs.push(e);
    }
    Ok(epochs)
}

/// Writes the root public key for auditors.
pub fn write_root(dir: &Path, root: &PublicKey) -> Result<(), AuditError> {
    let pem = root.to_pem().map_err(|e| AuditError::Key(e.to_string()))?;
    let path = dir.join(ROOT_PUB);
    crate::state_dir::write_public(&path, pem.as_bytes())
        .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))
}

/// Reads a root public key (`audit.pub`), bounded and without following links.
pub fn read_root(path: &Path) -> Result<PublicKey, AuditError> {
    let bytes = securerun_models::fsutil::read_bounded(path, 16 * 1024)
        .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))?;
    PublicKey::from_pem(&String::from_utf8_lossy(&bytes))
        .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))
}

/// Is `c` one of this log's signed heads? Returns the epoch it belongs to when its signature
/// verifies under one of the keys the walk learned for its epoch (an anchor may be a
/// checkpoint since removed from the file, signed by the key its predecessor named).
pub fn authenticate<'a>(epochs: &'a [Epoch], c: &Checkpoint) -> Option<&'a Epoch> {
    let e = epochs.iter().find(|e| e.epoch == c.epoch)?;
    (c.v == 2 && e.keys.iter().any(|k| c.verify(k))).then_some(e)
}

/// The segment of `epoch`, for messages.
pub fn segment_place(epoch: u32) -> String {
    segment::segment_name(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_unchanged_and_with_its_epoch_key() {
        let k1 = EpochSecrets::generate(1);
        let k2 = EpochSecrets::generate(2);
        let c = Checkpoint::sign(&k1, 7, &[3; 32], &k2).unwrap();
        assert!(c.verify(&k1.public_key()));
        assert!(!c.verify(&k2.public_key()));
        for edit in [
            |c: &mut Checkpoint| c.seq += 1,
            |c: &mut Checkpoint| c.head = "00".repeat(32),
            |c: &mut Checkpoint| c.time_ms += 1,
            |c: &mut Checkpoint| c.next_epoch = Some(9),
            |c: &mut Checkpoint| c.next_key = String::new(),
            |c: &mut Checkpoint| c.next_commit = Some("00".repeat(32)),
        ] {
            let mut bad = c.clone();
            edit(&mut bad);
            assert!(!bad.verify(&k1.public_key()));
        }
        let syslog = format!(
            "<110>1 2026-11-30T00:00:00Z host securerun - - - {}",
            c.to_line()
        );
        assert_eq!(Checkpoint::from_line(&syslog), Some(c));
    }
}
