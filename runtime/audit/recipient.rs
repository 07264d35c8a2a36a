//! The auditor's keys, and how each epoch's record key reaches the auditor.
//!
//! The auditor holds an X25519 secret (`read.key`, made by `securerun audit keygen` on the
//! auditor's machine); the host holds only its public half (`recipient.pub`). When an epoch
//! begins, its fresh record key is encrypted to the recipient: an ephemeral X25519 key pair,
//! the shared secret through HKDF-SHA256 (salted with both public keys, bound to the epoch),
//! and XChaCha20-Poly1305 over the 32-byte record key. The ephemeral secret is dropped (and
//! zeroed) at once, so the host cannot open what it wrapped: reading the log takes the
//! auditor's key, and a stolen host yields no epoch's record key but the current one's.
//!
//! Hand-written rather than HPKE because the construction is these three library calls and
//! the `hpke` crate needs a newer rand_core than the rest of the tree; X25519, HKDF and the
//! AEAD are the well-kept RustCrypto / dalek implementations.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::secret::Secret;
use super::AuditError;

/// The auditor's secret (`read.key`).
pub const READ_KEY: &str = "read.key";
/// Its public half, on the host.
pub const RECIPIENT: &str = "recipient.pub";
const READ_TAG: &str = "securerun-audit-read-key v2";
const RECIPIENT_TAG: &str = "securerun-audit-recipient v2";
const WRAP_INFO: &[u8] = b"securerun-audit v2 epoch key wrap";

/// Reads and nothing more: it decrypts epoch record keys, and signs nothing.
pub struct ReadKey(Secret);

/// Where epoch record keys are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipient(pub [u8; 32]);

impl ReadKey {
    pub fn generate() -> Self {
        ReadKey(Secret::random())
    }

    fn secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(*self.0.expose())
    }

    pub fn recipient(&self) -> Recipient {
        Recipient(x25519_dalek::PublicKey::from(&self.secret()).to_bytes())
    }

    pub fn load(path: &Path) -> Result<ReadKey, AuditError> {
        let bytes = Zeroizing::new(
            securerun_models::fsutil::read_bounded(path, 4096)
                .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))?,
        );
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.trim().strip_prefix(READ_TAG))
            .and_then(|hex| Secret::from_hex(hex.trim()))
            .map(ReadKey)
            .ok_or_else(|| {
                AuditError::Key(format!(
                    "{}: not an audit read key (a log made before securerun 0.2 is read with `audit migrate`)",
                    path.display()
                ))
            })
    }

    pub fn store(&self, path: &Path) -> Result<(), AuditError> {
        let hex = self.0.to_hex();
        let mut text = Zeroizing::new(String::with_capacity(100));
        text.push_str(READ_TAG);
        text.push(' ');
        text.push_str(&hex);
        text.push('\n');
        super::keys::write_secret(path, text.as_bytes())
    }

    /// Opens epoch `epoch`'s wrapped record key.
    pub fn unwrap(&self, w: &Wrapped, epoch: u32) -> Result<Secret, String> {
        let recipient = self.recipient();
        if w.epoch != epoch {
            return Err(format!("it is epoch {}'s key", w.epoch));
        }
        if w.recipient != hex::encode(recipient.0) {
            return Err("it was encrypted to another read key".into());
        }
        let eph: [u8; 32] = decode_hex(&w.ephemeral).ok_or("malformed ephemeral key")?;
        let nonce: [u8; 24] = decode_hex(&w.nonce).ok_or("malformed nonce")?;
        let ct = hex::decode(&w.ct).map_err(|_| "malformed ciphertext")?;
        let shared = self
            .secret()
            .diffie_hellman(&x25519_dalek::PublicKey::from(eph));
        let kek = kek(shared.as_bytes(), &eph, &recipient.0, epoch);
        let plain = Zeroizing::new(
            XChaCha20Poly1305::new(kek.as_ref().into())
                .decrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: &ct,
                        aad: &aad(epoch, &recipient.0),
                    },
                )
                .map_err(|_| "it does not decrypt with this read key (altered or foreign)")?,
        );
        Secret::from_slice(&plain).ok_or_else(|| "not a 32-byte key".into())
    }
}

impl Recipient {
    pub fn load(path: &Path) -> Result<Recipient, AuditError> {
        let bytes = securerun_models::fsutil::read_bounded(path, 4096)
            .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())))?;
        String::from_utf8_lossy(&bytes)
            .trim()
            .strip_prefix(RECIPIENT_TAG)
            .and_then(|h| decode_hex::<32>(h.trim()))
            .map(Recipient)
            .ok_or_else(|| {
                AuditError::Key(format!(
                    "{}: not an audit recipient (made by securerun audit keygen)",
                    path.display()
                ))
            })
    }

    pub fn encode(&self) -> String {
        format!("{RECIPIENT_TAG} {}\n", hex::encode(self.0))
    }

    /// Encrypts epoch `epoch`'s record key to this recipient.
    pub fn wrap(&self, epoch: u32, record_key: &[u8; 32]) -> Wrapped {
        let eph = x25519_dalek::EphemeralSecret::random_from_rng(rand_core::OsRng);
        let eph_pub = x25519_dalek::PublicKey::from(&eph).to_bytes();
        let shared = eph.diffie_hellman(&x25519_dalek::PublicKey::from(self.0));
        let kek = kek(shared.as_bytes(), &eph_pub, &self.0, epoch);
        let nonce = super::keys::random_bytes::<24>();
        let ct = XChaCha20Poly1305::new(kek.as_ref().into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: record_key,
                    aad: &aad(epoch, &self.0),
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
        Wrapped {
            v: 2,
            epoch,
            recipient: hex::encode(self.0),
            ephemeral: hex::encode(eph_pub),
            nonce: hex::encode(nonce),
            ct: hex::encode(ct),
        }
    }
}

fn kek(shared: &[u8; 32], eph: &[u8; 32], recipient: &[u8; 32], epoch: u32) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut info = WRAP_INFO.to_vec();
    info.extend_from_slice(&epoch.to_le_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(&info, out.as_mut())
        .expect("32 bytes is a valid HKDF length");
    out
}

fn aad(epoch: u32, recipient: &[u8; 32]) -> Vec<u8> {
    let mut a = WRAP_INFO.to_vec();
    a.extend_from_slice(&epoch.to_le_bytes());
    a.extend_from_slice(recipient);
    a
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// `key-EEEEEEEE.wrap`: one epoch's record key, encrypted to the auditor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wrapped {
    pub v: u32,
    pub epoch: u32,
    pub recipient: String,
    pub ephemeral: String,
    pub nonce: String,
    pub ct: String,
}

pub fn wrap_name(epoch: u32) -> String {
    format!("key-{epoch:08}.wrap")
}

impl Wrapped {
    pub fn read(path: &Path) -> Result<Wrapped, String> {
        let bytes =
            securerun_models::fsutil::read_bounded(path, 4096).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("not a wrapped key: {e}"))
    }

    pub fn store(&self, path: &Path) -> Result<(), AuditError> {
        let json = serde_json::to_vec(self).map_err(|e| AuditError::Io(e.to_string()))?;
        super::keys::write_secret(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_read_key_opens_a_wrapped_epoch_key_and_only_for_its_epoch() {
        let reader = ReadKey::generate();
        let other = ReadKey::generate();
        let record = Secret::random();
        let w = reader.recipient().wrap(7, record.expose());
        assert_eq!(reader.unwrap(&w, 7).unwrap().expose(), record.expose());
        assert!(reader.unwrap(&w, 8).is_err());
        assert!(other.unwrap(&w, 7).is_err());
        let mut moved = w.clone();
        moved.epoch = 8;
        assert!(reader.unwrap(&moved, 8).is_err());
        let mut edited = w.clone();
        edited
            .ct
            .replace_range(0..2, if &w.ct[0..2] == "00" { "01" } else { "00" });
        assert!(reader.unwrap(&edited, 7).is_err());
    }

    #[test]
    fn keys_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let k = ReadKey::generate();
        k.store(&dir.path().join("read.key")).unwrap();
        let back = ReadKey::load(&dir.path().join("read.key")).unwrap();
        assert!(back.recipient() == k.recipient());
        std::fs::write(dir.path().join("r.pub"), k.recipient().encode()).unwrap();
        assert!(Recipient::load(&dir.path().join("r.pub")).unwrap() == k.recipient());
    }
}
