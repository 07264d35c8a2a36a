//! Audit keys of the old (v1) format, read-only: the epoch-0 read key derives every later
//! epoch's key (and checkpoint key) by an HKDF ratchet.
//!
//! - `read.key`: the epoch-0 key. Everything can be derived from it, so it is what an auditor
//!   needs to read and verify the log; `audit init` tells the operator to move it off the host.
//! - `current.key`: the running epoch's key. Each new epoch (every server start and segment
//!   rotation) replaces it with `K(e+1) = HKDF(K(e), "epoch")` and the previous key is gone from
//!   the host, so whoever takes the running host can neither decrypt nor forge records of
//!   earlier epochs (the AEAD keys of those epochs are not derivable backwards).
//! - `pseudonym.key`: a stable HMAC key for client addresses (and `--audit-content hmac`), so
//!   records link a client across epochs without storing its address.

use std::path::Path;

use hkdf::Hkdf;
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::AuditError;

pub const READ_KEY: &str = "read.key";
pub const CURRENT_KEY: &str = "current.key";
pub const PSEUDONYM_KEY: &str = "pseudonym.key";

/// One epoch's root key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct EpochKey {
    #[zeroize(skip)]
    pub epoch: u32,
    key: [u8; 32],
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochKey(epoch {})", self.epoch)
    }
}

impl EpochKey {
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        EpochKey { epoch: 0, key }
    }

    fn expand(&self, label: &[u8]) -> [u8; 32] {
        let hk = Hkdf::<Sha256>::from_prk(&self.key).expect("32-byte PRK");
        let mut out = [0u8; 32];
        hk.expand(label, &mut out)
            .expect("32 bytes is a valid HKDF length");
        out
    }

    /// The next epoch's key; this one should then be forgotten.
    pub fn next(&self) -> EpochKey {
        EpochKey {
            epoch: self.epoch + 1,
            key: self.expand(b"securerun audit v1 epoch ratchet"),
        }
    }

    /// The key that seals this epoch's records (XChaCha20-Poly1305).
    pub fn record_key(&self) -> [u8; 32] {
        self.expand(b"securerun audit v1 record key")
    }

    /// The key that signs this epoch's checkpoints (ECDSA P-256), derived so that it evolves
    /// and is erased with the epoch key.
    pub fn checkpoint_key(&self) -> crate::signing::PrivateKey {
        // A 32-byte string is a valid P-256 scalar unless it is zero or >= the group order
        // (probability ~2^-32); the counter picks the next candidate in that case.
        for counter in 0u8..=255 {
            let mut label = b"securerun audit v1 checkpoint key ".to_vec();
            label.push(counter);
            let mut bytes = self.expand(&label);
            let key = p256::ecdsa::SigningKey::from_slice(&bytes);
            bytes.zeroize();
            if let Ok(k) = key {
                return crate::signing::PrivateKey::P256(k);
            }
        }
        unreachable!("256 consecutive invalid P-256 scalars from HKDF")
    }

    /// Derives epoch `target` from this (earlier or equal) epoch.
    pub fn advance_to(&self, target: u32) -> Option<EpochKey> {
        if target < self.epoch {
            return None;
        }
        let mut k = self.clone();
        while k.epoch < target {
            k = k.next();
        }
        Some(k)
    }

    fn decode(text: &str) -> Option<EpochKey> {
        let mut parts = text.split_whitespace();
        if (parts.next(), parts.next()) != (Some("securerun-audit-key"), Some("v1")) {
            return None;
        }
        let epoch = parts.next()?.parse().ok()?;
        let bytes = hex::decode(parts.next()?).ok()?;
        Some(EpochKey {
            epoch,
            key: bytes.try_into().ok()?,
        })
    }

    pub fn load(path: &Path) -> Result<EpochKey, AuditError> {
        let bytes = securerun_models::fsutil::read_bounded(path, 4096)
            .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))?;
        EpochKey::decode(&String::from_utf8_lossy(&bytes))
            .ok_or_else(|| AuditError::Key(format!("{}: not an audit key", path.display())))
    }
}
