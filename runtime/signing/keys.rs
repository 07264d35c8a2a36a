//! ECDSA keys for model signing (NIST P-256, P-384, P-521), in the PEM forms the OpenSSF
//! `model_signing` CLI uses: PKCS#8 or SEC1 private keys, SubjectPublicKeyInfo public keys.
//! All cryptography is RustCrypto's; nothing here is hand-written crypto.

use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use sha2::{Digest, Sha256};

use super::SigningError;

/// A private key that can sign.
pub enum PrivateKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

/// A public key that can verify.
#[derive(Clone)]
pub enum PublicKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
}

impl PrivateKey {
    /// A fresh P-256 key from the OS random generator.
    pub fn generate_p256() -> Self {
        PrivateKey::P256(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng))
    }

    /// Parses a PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`) PEM.
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(PrivateKey::P256(k));
        }
        if let Ok(k) = p384::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(PrivateKey::P384(k));
        }
        if let Ok(k) = p256::SecretKey::from_sec1_pem(pem) {
            return Ok(PrivateKey::P256(k.into()));
        }
        if let Ok(k) = p384::SecretKey::from_sec1_pem(pem) {
            return Ok(PrivateKey::P384(k.into()));
        }
        Err(SigningError::Key(
            "not a P-256 or P-384 private key in PKCS#8 or SEC1 PEM".into(),
        ))
    }

    /// PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String, SigningError> {
        let pem = match self {
            PrivateKey::P256(k) => k.to_pkcs8_pem(LineEnding::LF),
            PrivateKey::P384(k) => k.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(|e| SigningError::Key(e.to_string()))?;
        Ok(pem.to_string())
    }

    pub fn public_key(&self) -> PublicKey {
        match self {
            PrivateKey::P256(k) => PublicKey::P256(*k.verifying_key()),
            PrivateKey::P384(k) => PublicKey::P384(*k.verifying_key()),
        }
    }

    /// DER-encoded ECDSA signature over `message` (SHA-256 for P-256, SHA-384 for P-384).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer;
        match self {
            PrivateKey::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                sig.to_der().as_bytes().to_vec()
            }
            PrivateKey::P384(k) => {
                let sig: p384::ecdsa::Signature = k.sign(message);
                sig.to_der().as_bytes().to_vec()
            }
        }
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.hint().unwrap_or_default();
        write!(f, "PublicKey({}, {id})", self.curve())
    }
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo PEM (`PUBLIC KEY`).
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            return Ok(PublicKey::P256(k));
        }
        if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            return Ok(PublicKey::P384(k));
        }
        if let Ok(k) = p521::PublicKey::from_public_key_pem(pem) {
            let vk = p521::ecdsa::VerifyingKey::from_affine(*k.as_affine())
                .map_err(|e| SigningError::Key(e.to_string()))?;
            return Ok(PublicKey::P521(vk));
        }
        Err(SigningError::Key(
            "not a P-256, P-384 or P-521 public key in SubjectPublicKeyInfo PEM".into(),
        ))
    }

    /// Parses a DER SubjectPublicKeyInfo (as found in a certificate).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SigningError> {
        if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_der(der) {
            return Ok(PublicKey::P256(k));
        }
        if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_der(der) {
            return Ok(PublicKey::P384(k));
        }
        if let Ok(k) = p521::PublicKey::from_public_key_der(der) {
            let vk = p521::ecdsa::VerifyingKey::from_affine(*k.as_affine())
                .map_err(|e| SigningError::Key(e.to_string()))?;
            return Ok(PublicKey::P521(vk));
        }
        Err(SigningError::Key(
            "the certificate's key is not a P-256, P-384 or P-521 ECDSA key".into(),
        ))
    }

    /// SubjectPublicKeyInfo PEM, as `cryptography` writes it (64-column base64, LF).
    pub fn to_pem(&self) -> Result<String, SigningError> {
        let pem = match self {
            PublicKey::P256(k) => k.to_public_key_pem(LineEnding::LF),
            PublicKey::P384(k) => k.to_public_key_pem(LineEnding::LF),
            PublicKey::P521(k) => {
                let point = k.to_encoded_point(false);
                p521::PublicKey::from_sec1_bytes(point.as_bytes())
                    .map_err(|e| SigningError::Key(e.to_string()))?
                    .to_public_key_pem(LineEnding::LF)
            }
        }
        .map_err(|e| SigningError::Key(e.to_string()))?;
        Ok(pem)
    }

    /// The bundle's `publicKey.hint`: SHA-256 (hex) of the SPKI PEM.
    pub fn hint(&self) -> Result<String, SigningError> {
        Ok(hex::encode(Sha256::digest(self.to_pem()?.as_bytes())))
    }

    pub fn curve(&self) -> &'static str {
        match self {
            PublicKey::P256(_) => "P-256",
            PublicKey::P384(_) => "P-384",
            PublicKey::P521(_) => "P-521",
        }
    }

    /// Verifies a DER ECDSA signature over `message`. High-S signatures (which other signers
    /// produce) are accepted by normalizing first; malleability does not matter here because
    /// the signed statement, not the signature, identifies the model.
    pub fn verify(&self, message: &[u8], der: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        match self {
            PublicKey::P256(k) => p256::ecdsa::Signature::from_der(der)
                .map(|s| s.normalize_s().unwrap_or(s))
                .is_ok_and(|s| k.verify(message, &s).is_ok()),
            PublicKey::P384(k) => p384::ecdsa::Signature::from_der(der)
                .map(|s| s.normalize_s().unwrap_or(s))
                .is_ok_and(|s| k.verify(message, &s).is_ok()),
            PublicKey::P521(k) => p521::ecdsa::Signature::from_der(der)
                .map(|s| s.normalize_s().unwrap_or(s))
                .is_ok_and(|s| k.verify(message, &s).is_ok()),
        }
    }
}
