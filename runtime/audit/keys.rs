//! The host's audit keys: one epoch's secrets at a time, and the pseudonymization key.
//!
//! - `current.key` (0600): the running epoch's secrets, each fresh from the OS random
//!   generator: the *record key* that seals its records (XChaCha20-Poly1305), the *frame MAC
//!   key* (the writer's own tag on each frame), and the one-time *checkpoint key* that signs
//!   the next checkpoint (ECDSA P-256; replaced by a fresh one at every checkpoint). Nothing
//!   derives one key from another, so a copy of `current.key` (a thief, a backup) reads the
//!   current epoch and signs its next checkpoint only: neither earlier checkpoints nor earlier
//!   epochs (their keys were erased), nor later epochs (fresh randomness the copy lacks).
//! - `next.key` exists only while a checkpoint or an epoch handover is being made (see
//!   `writer::begin_epoch`).
//! - Each epoch's record key reaches the auditor as `key-EEEEEEEE.wrap`, encrypted to the
//!   auditor's public key ([`super::recipient`]); the host keeps no key that opens them.
//! - `pseudonym.key` (0600): a long-lived HMAC key for client addresses and `--audit-content
//!   hmac`. It is a secret: whoever holds it can test guesses of addresses and texts against
//!   the log's pseudonyms. It is kept apart from the log's keys and never written to a log.
//!
//! Old epochs' keys are erased on disk by overwriting the file in place and syncing before it is
//! replaced ([`erase_file`]), and in memory by [`Secret`].

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::secret::Secret;
use super::AuditError;
use crate::signing::PublicKey;

pub const CURRENT_KEY: &str = "current.key";
pub const NEXT_KEY: &str = "next.key";
pub const PSEUDONYM_KEY: &str = "pseudonym.key";
const EPOCH_KEY_TAG: &str = "securerun-audit-epoch v2";

/// One epoch's secrets: the record key (wrapped to the auditor), the checkpoint signing key
/// (one per checkpoint: each checkpoint names the next one's public key, and the used one is
/// erased, so a copy taken at time T cannot re-sign an earlier checkpoint, not even of the
/// same epoch), and the frame MAC key (never leaves the host; it lets the writer tell its own
/// records from ones made with the read key — the auditor can seal records, not MAC them).
pub struct EpochSecrets {
    pub epoch: u32,
    record: Secret,
    signing: Secret,
    mac: Secret,
}

impl std::fmt::Debug for EpochSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochSecrets(epoch {})", self.epoch)
    }
}

impl EpochSecrets {
    /// Fresh secrets for `epoch`.
    pub fn generate(epoch: u32) -> Self {
        EpochSecrets {
            epoch,
            record: Secret::random(),
            signing: random_p256_scalar(),
            mac: Secret::random(),
        }
    }

    /// The same epoch's secrets with the next checkpoint signing key (see the type's docs).
    pub fn with_next_signing_key(&self) -> Self {
        EpochSecrets {
            epoch: self.epoch,
            record: Secret::from_slice(self.record.expose()).expect("32 bytes"),
            signing: random_p256_scalar(),
            mac: Secret::from_slice(self.mac.expose()).expect("32 bytes"),
        }
    }

    /// The writer's tag over a frame (HMAC-SHA256, first 16 bytes).
    pub fn frame_mac(&self, data: &[u8]) -> [u8; 16] {
        use hmac::{Mac, SimpleHmac};
        let mut mac =
            <SimpleHmac<Sha256> as Mac>::new_from_slice(self.mac.expose()).expect("any key length");
        mac.update(data);
        let mut out = [0u8; 16];
        out.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        out
    }

    pub fn record_key(&self) -> &[u8; 32] {
        self.record.expose()
    }

    /// The checkpoint signing key, for one use (dropped, and zeroed by p256, right after).
    fn signing_key(&self) -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(self.signing.expose())
            .expect("checked to be a valid P-256 scalar when generated or loaded")
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::P256(*self.signing_key().verifying_key())
    }

    /// DER ECDSA P-256/SHA-256 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer;
        let sig: p256::ecdsa::Signature = self.signing_key().sign(message);
        sig.to_der().as_bytes().to_vec()
    }

    /// A commitment to the record key, named in the handover that begins this epoch: the
    /// auditor checks that the key unwrapped from `key-E.wrap` is the one the signer meant.
    pub fn record_commitment(&self) -> String {
        record_commitment(self.record.expose())
    }

    fn encode(&self) -> Zeroizing<String> {
        let (r, s, m) = (
            self.record.to_hex(),
            self.signing.to_hex(),
            self.mac.to_hex(),
        );
        let mut out = Zeroizing::new(String::with_capacity(EPOCH_KEY_TAG.len() + 250));
        out.push_str(EPOCH_KEY_TAG);
        out.push(' ');
        out.push_str(&self.epoch.to_string());
        out.push(' ');
        out.push_str(&r);
        out.push(' ');
        out.push_str(&s);
        out.push(' ');
        out.push_str(&m);
        out.push('\n');
        out
    }

    fn decode(text: &str) -> Option<EpochSecrets> {
        let rest = text.strip_prefix(EPOCH_KEY_TAG)?;
        let mut parts = rest.split_whitespace();
        let epoch = parts.next()?.parse().ok()?;
        let record = Secret::from_hex(parts.next()?)?;
        let signing = Secret::from_hex(parts.next()?)?;
        let mac = Secret::from_hex(parts.next()?)?;
        if parts.next().is_some() || p256::ecdsa::SigningKey::from_slice(signing.expose()).is_err()
        {
            return None;
        }
        Some(EpochSecrets {
            epoch,
            record,
            signing,
            mac,
        })
    }

    /// Reads an epoch key file (O_NOFOLLOW, regular, bounded; the buffer is zeroed after).
    pub fn load(path: &Path) -> Result<EpochSecrets, AuditError> {
        let bytes = Zeroizing::new(
            securerun_models::fsutil::read_bounded(path, 4096)
                .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))?,
        );
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(EpochSecrets::decode)
            .ok_or_else(|| AuditError::Key(format!("{}: not an audit epoch key", path.display())))
    }

    /// Writes the secrets to a new file (0600) by write-aside + rename.
    pub fn store(&self, path: &Path) -> Result<(), AuditError> {
        write_secret(path, self.encode().as_bytes())
    }
}

/// A P-256 scalar drawn in place: 32 random bytes, redrawn in the (≈2⁻³²) case they are zero
/// or not below the group order.
fn random_p256_scalar() -> Secret {
    loop {
        let s = Secret::random();
        if p256::ecdsa::SigningKey::from_slice(s.expose()).is_ok() {
            return s;
        }
    }
}

pub fn record_commitment(record_key: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"securerun-audit v2 record key commitment\n");
    h.update(record_key);
    hex::encode(h.finalize())
}

/// Writes `bytes` to `path` (0600) through a new file renamed into place, so the file is never
/// half written. The file must not exist as anything but a regular file we may replace. The
/// temporary is `.NAME.tmp`: a crash before the rename leaves a hidden file that no reader
/// takes for one of the log's own (`key-E.tmp` would look planted and stop the writer).
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let io = |e: std::io::Error| AuditError::Io(format!("{}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path);
    Ok(())
}

/// Overwrites a key file's bytes with zeros in place and syncs them, so the old key is gone
/// from the disk blocks the file used, not only from its name. A missing file is fine.
pub fn erase_file(path: &Path) -> Result<(), AuditError> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| AuditError::Io(format!("{}: {e}", path.display()));
    let f = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(AuditError::Io(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    let zeros = vec![0u8; meta.len().min(1 << 20) as usize];
    f.write_all_at(&zeros, 0)
        .and_then(|_| f.sync_all())
        .map_err(io)
}

/// Makes a rename or a new directory entry in `path`'s directory durable.
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// The pseudonymization key (created on first use, 0600, its own file).
pub fn pseudonym_key(dir: &Path) -> Result<Secret, AuditError> {
    let path = dir.join(PSEUDONYM_KEY);
    match securerun_models::fsutil::read_bounded(&path, 4096) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            return std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| Secret::from_hex(t.trim()))
                .ok_or_else(|| AuditError::Key(format!("{}: not a key", path.display())));
        }
        Err(securerun_models::fsutil::OpenError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AuditError::Key(e.to_string())),
    }
    let key = Secret::random();
    write_secret(&path, key.to_hex().as_bytes())?;
    Ok(key)
}

/// HMAC-SHA256 of `value` under `key`, hex (first 16 bytes): a pseudonym.
pub fn pseudonym(key: &Secret, value: &str) -> String {
    use hmac::{Mac, SimpleHmac};
    let mut mac =
        <SimpleHmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("any key length");
    mac.update(value.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// 32 random bytes (nonces, names).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}

/// What is pseudonymized for an end user a request names (OpenAI's `user`): in a domain of its
/// own, so the same text as a client address or a content gives another pseudonym.
pub fn end_user_text(user: &str) -> String {
    format!("end-user\0{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_secrets_round_trip_and_are_independent() {
        let dir = tempfile::tempdir().unwrap();
        let a = EpochSecrets::generate(4);
        let b = EpochSecrets::generate(5);
        assert_ne!(a.record_key(), b.record_key());
        a.store(&dir.path().join("k")).unwrap();
        let back = EpochSecrets::load(&dir.path().join("k")).unwrap();
        assert_eq!(back.epoch, 4);
        assert_eq!(back.record_key(), a.record_key());
        let sig = a.sign(b"m");
        assert!(back.public_key().verify(b"m", &sig));
        assert!(!b.public_key().verify(b"m", &sig));
    }

    #[test]
    fn erasing_overwrites_the_bytes_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        EpochSecrets::generate(1).store(&path).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        erase_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    }
}
