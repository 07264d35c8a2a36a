//! Signed checkpoints: `(epoch, record count, chain head, time)` statements signed with the
//! epoch's ECDSA P-256 key, appended to `checkpoints.jsonl` beside the segments.
//!
//! Why: the hash chain proves records are consistent with each other; a checkpoint is a
//! signed, shippable statement of how far the log went, which an auditor can check with a
//! public key alone (no read key, nothing decrypted) and keep off the host.
//!
//! Keys: epoch E's signing key is derived from the epoch key `K(E)` (HKDF), so it evolves and
//! is erased with it: whoever takes the running host can sign for the current epoch only. The
//! read key derives every later epoch's public key; for holders of the public root alone
//! (`audit.pub`, epoch 0's public key, written when the log is created), each epoch's first
//! checkpoint is a *handover*, signed by the previous epoch's key, that names the next epoch's
//! public key. A verifier walks that chain from the root.
//!
//! When: at every epoch start (the handover), after every [`EVERY_RECORDS`] records or
//! [`EVERY`] of activity, and when the writer stops.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keys::EpochKey;
use super::AuditError;
use crate::signing::PublicKey;

pub const CHECKPOINTS: &str = "checkpoints.jsonl";
/// Epoch 0's checkpoint public key: the root an auditor without the read key trusts.
pub const ROOT_PUB: &str = "audit.pub";
/// A checkpoint after this many records...
pub const EVERY_RECORDS: u64 = 1000;
/// ...or this long after the previous one, whichever comes first (if anything was written).
pub const EVERY: Duration = Duration::from_secs(60);
/// Largest checkpoints file read (a line is about 250 bytes; a handover about 400).
const MAX_FILE: u64 = 256 * 1024 * 1024;

/// One signed statement about the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The epoch whose key signed this.
    pub epoch: u32,
    /// Records in the log so far (the sequence number of the last one).
    pub seq: u64,
    /// Chain head (hex) after record `seq`.
    pub head: String,
    pub time_ms: u64,
    /// Handover only: the epoch that starts now, and its checkpoint public key (SPKI PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_epoch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<String>,
    /// Base64 DER ECDSA P-256/SHA-256 signature over [`Checkpoint::message`].
    pub sig: String,
}

impl Checkpoint {
    /// A signed checkpoint of `(seq, head)` by `key`'s epoch; with `next`, a handover to it.
    pub fn sign(
        key: &EpochKey,
        seq: u64,
        head: &[u8; 32],
        next: Option<&EpochKey>,
    ) -> Result<Checkpoint, AuditError> {
        let next_key = next
            .map(|n| n.checkpoint_key().public_key().to_pem())
            .transpose()
            .map_err(|e| AuditError::Key(e.to_string()))?;
        let mut c = Checkpoint {
            epoch: key.epoch,
            seq,
            head: hex::encode(head),
            time_ms: super::now_ms(),
            next_epoch: next.map(|n| n.epoch),
            next_key,
            sig: String::new(),
        };
        c.sig = crate::signing::bundle::b64_encode(&key.checkpoint_key().sign(&c.message()));
        Ok(c)
    }

    /// The exact bytes signed: every field but the signature, unambiguously.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "securerun-audit-checkpoint v1\nepoch {}\nseq {}\nhead {}\ntime_ms {}\nnext_epoch {}\nnext_key {}\n",
            self.epoch,
            self.seq,
            self.head,
            self.time_ms,
            self.next_epoch.map_or("-".to_string(), |e| e.to_string()),
            // JSON-quoted: every key string has exactly one encoding here.
            serde_json::to_string(&self.next_key).unwrap_or_default(),
        )
        .into_bytes()
    }

    pub fn verify(&self, key: &PublicKey) -> bool {
        crate::signing::bundle::b64_decode(&self.sig)
            .map(|der| key.verify(&self.message(), &der))
            .unwrap_or(false)
    }

    /// The handover's next public key, parsed.
    pub fn next_public_key(&self) -> Option<PublicKey> {
        self.next_key
            .as_deref()
            .and_then(|pem| PublicKey::from_pem(pem).ok())
    }
}

/// The checkpoints file as read: complete lines parsed, and a torn last line (a crash during
/// a write) reported rather than taken.
#[derive(Debug, Default)]
pub struct Checkpoints {
    pub list: Vec<Checkpoint>,
    pub torn: Option<String>,
}

/// Reads `checkpoints.jsonl`; a malformed complete line is an error naming it.
pub fn read(dir: &Path) -> Result<Checkpoints, String> {
    let path = dir.join(CHECKPOINTS);
    let bytes = match securerun_models::fsutil::read_bounded(&path, MAX_FILE) {
        Ok(b) => b,
        Err(securerun_models::fsutil::OpenError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(Checkpoints::default())
        }
        Err(e) => return Err(e.to_string()),
    };
    let mut out = Checkpoints::default();
    let mut rest = bytes.as_slice();
    let mut line_no = 0;
    while !rest.is_empty() {
        line_no += 1;
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            out.torn = Some(format!(
                "{CHECKPOINTS} line {line_no} is incomplete ({} bytes)",
                rest.len()
            ));
            break;
        };
        let c: Checkpoint = serde_json::from_slice(&rest[..end])
            .map_err(|e| format!("{CHECKPOINTS} line {line_no}: not a checkpoint: {e}"))?;
        out.list.push(c);
        rest = &rest[end + 1..];
    }
    Ok(out)
}

/// Where the chain stood when `epoch` began, as its handover states it: `(0, zeros)` for epoch
/// 1. After retention shredded the epochs before it, this is where the log now starts.
pub fn start_of(list: &[Checkpoint], epoch: u32) -> Option<(u64, [u8; 32])> {
    if epoch <= 1 {
        return Some((0, [0; 32]));
    }
    let c = list.iter().find(|c| c.next_epoch == Some(epoch))?;
    let head = hex::decode(&c.head).ok()?.try_into().ok()?;
    Some((c.seq, head))
}

/// Which public key signs for which epoch, as far as a verifier knows.
pub enum KeySource {
    /// The read key (epoch r): every epoch ≥ r's key is derived; earlier ones are unknown.
    ReadKey(EpochKey),
    /// Only the public root: epochs are learned from handovers.
    Root(PublicKey),
}

/// Checks every checkpoint's signature, in file order, learning epoch keys from handovers.
/// Returns, for each checkpoint, whether its signer was known (checkpoints of shredded epochs
/// cannot be checked by a retained read key and are skipped). Epochs above `max_epoch` (the
/// newest segment's, plus one for a handover whose segment a crash kept from being created)
/// are refused before any key is derived for them: a planted epoch number must not make the
/// verifier ratchet billions of times.
pub fn authenticate(
    list: &[Checkpoint],
    source: &KeySource,
    max_epoch: u32,
) -> Result<Vec<bool>, String> {
    use std::collections::BTreeMap;
    let mut learned: BTreeMap<u32, PublicKey> = BTreeMap::new();
    let mut derive = Deriver::new(source);
    if let KeySource::Root(root) = source {
        learned.insert(0, root.clone());
    }
    let mut checked = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let n = i + 1;
        if c.epoch.max(c.next_epoch.unwrap_or(0)) > max_epoch {
            return Err(format!(
                "checkpoint {n} names epoch {}, beyond the newest segment ({})",
                c.epoch.max(c.next_epoch.unwrap_or(0)),
                max_epoch.saturating_sub(1)
            ));
        }
        let key = match source {
            KeySource::ReadKey(_) => derive.public(c.epoch),
            KeySource::Root(_) => learned.get(&c.epoch).cloned(),
        };
        let Some(key) = key else {
            if matches!(source, KeySource::Root(_)) {
                return Err(format!(
                    "checkpoint {n} (epoch {}): no handover names this epoch's key",
                    c.epoch
                ));
            }
            checked.push(false);
            continue;
        };
        if !c.verify(&key) {
            return Err(format!(
                "checkpoint {n} (epoch {}, record {}): the signature does not verify (forged or edited)",
                c.epoch, c.seq
            ));
        }
        match (c.next_epoch, c.next_public_key()) {
            (None, None) if c.next_key.is_none() => {}
            (Some(e), Some(k)) if e > c.epoch => {
                if matches!(source, KeySource::ReadKey(_))
                    && derive.public(e).map(|d| d.hint().ok()) != Some(k.hint().ok())
                {
                    return Err(format!(
                        "checkpoint {n}: the handover to epoch {e} names a key that is not that epoch's"
                    ));
                }
                if let Some(old) = learned.insert(e, k.clone()) {
                    if old.hint().ok() != k.hint().ok() {
                        return Err(format!(
                            "checkpoint {n}: a second handover to epoch {e} names another key"
                        ));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "checkpoint {n} (epoch {}): malformed handover",
                    c.epoch
                ))
            }
        }
        checked.push(true);
    }
    Ok(checked)
}

/// Checkpoint public keys derived from a read key, each epoch once (the ratchet only moves
/// forward, so keys are derived in one pass up to the highest epoch asked for).
struct Deriver {
    next: Option<EpochKey>,
    keys: std::collections::BTreeMap<u32, PublicKey>,
}

impl Deriver {
    fn new(source: &KeySource) -> Self {
        let next = match source {
            KeySource::ReadKey(k) => Some(k.clone()),
            KeySource::Root(_) => None,
        };
        Deriver {
            next,
            keys: Default::default(),
        }
    }

    /// Epoch `e`'s public key, or `None` before the read key's epoch.
    fn public(&mut self, e: u32) -> Option<PublicKey> {
        while let Some(k) = self.next.take_if(|k| k.epoch <= e) {
            self.keys.insert(k.epoch, k.checkpoint_key().public_key());
            self.next = Some(k.next());
        }
        self.keys.get(&e).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_unchanged_and_with_its_epoch_key() {
        let k0 = EpochKey::random();
        let k1 = k0.next();
        let c = Checkpoint::sign(&k0, 7, &[3; 32], Some(&k1)).unwrap();
        assert!(c.verify(&k0.checkpoint_key().public_key()));
        assert!(!c.verify(&k1.checkpoint_key().public_key()));
        for edit in [
            |c: &mut Checkpoint| c.seq += 1,
            |c: &mut Checkpoint| c.head = "00".repeat(32),
            |c: &mut Checkpoint| c.time_ms += 1,
            |c: &mut Checkpoint| c.next_epoch = Some(9),
            |c: &mut Checkpoint| c.next_key = None,
        ] {
            let mut bad = c.clone();
            edit(&mut bad);
            assert!(!bad.verify(&k0.checkpoint_key().public_key()));
        }
    }

    #[test]
    fn the_root_walks_handovers_and_refuses_unknown_epochs() {
        let k0 = EpochKey::random();
        let k1 = k0.next();
        let k2 = k1.next();
        let list = vec![
            Checkpoint::sign(&k0, 0, &[0; 32], Some(&k1)).unwrap(),
            Checkpoint::sign(&k1, 5, &[1; 32], None).unwrap(),
            Checkpoint::sign(&k1, 9, &[2; 32], Some(&k2)).unwrap(),
            Checkpoint::sign(&k2, 12, &[3; 32], None).unwrap(),
        ];
        let root = KeySource::Root(k0.checkpoint_key().public_key());
        assert_eq!(authenticate(&list, &root, 3).unwrap(), vec![true; 4]);
        // An epoch beyond the newest segment is refused before anything is derived for it.
        let mut far = Checkpoint::sign(&k2, 12, &[3; 32], None).unwrap();
        far.epoch = u32::MAX;
        assert!(authenticate(&[far], &KeySource::ReadKey(k0.clone()), 3)
            .unwrap_err()
            .contains("beyond the newest segment"));
        // Without the handover into epoch 2, epoch 2's checkpoint has no known key.
        let cut = [list[0].clone(), list[1].clone(), list[3].clone()];
        assert!(authenticate(&cut, &root, 3)
            .unwrap_err()
            .contains("no handover"));
        // A retained read key (epoch 2) checks what it can derive and skips the rest.
        let retained = KeySource::ReadKey(k2.clone());
        assert_eq!(
            authenticate(&list, &retained, 3).unwrap(),
            vec![false, false, false, true]
        );
        // A forger holding epoch 2's key cannot sign for epoch 1.
        let mut forged = Checkpoint::sign(&k2, 7, &[9; 32], None).unwrap();
        forged.epoch = 1;
        let with_forgery = [list[0].clone(), forged];
        assert!(authenticate(&with_forgery, &root, 3)
            .unwrap_err()
            .contains("does not verify"));
    }
}
