//! The OpenSSF model-signing v1.0 signature file: a Sigstore bundle (v0.3) holding a DSSE
//! envelope whose payload is an in-toto Statement v1 listing every file's SHA-256.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// Paths the reference signer ignores by default.
pub const DEFAULT_IGNORE: &[&str] = &[".git", ".github", ".gitignore", ".gitattributes"];

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    pub media_type: String,
    pub verification_material: VerificationMaterial,
    pub dsse_envelope: Envelope,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyHint>,
    /// Keyless (Sigstore) bundles: the Fulcio-issued leaf certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<RawCertificate>,
    /// Certificate-mode bundles: the signing certificate first, then its chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_certificate_chain: Option<CertificateChain>,
    #[serde(default)]
    pub tlog_entries: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawCertificate {
    /// Base64 of the DER certificate.
    pub raw_bytes: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateChain {
    pub certificates: Vec<RawCertificate>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PublicKeyHint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    pub sig: String,
    #[serde(default)]
    pub keyid: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub kind: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Predicate,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: SubjectDigest,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SubjectDigest {
    pub sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Predicate {
    pub resources: Vec<Resource>,
    pub serialization: Serialization,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub name: String,
    pub algorithm: String,
    pub digest: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Serialization {
    pub method: String,
    pub hash_type: String,
    /// `shards` only. The reference signer writes it as a JSON float (`1000000000.0`: it goes
    /// through a protobuf `Struct`), so it is kept as a number and checked when used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_size: Option<serde_json::Number>,
    pub allow_symlinks: bool,
    #[serde(default)]
    pub ignore_paths: Vec<String>,
}

/// DSSE pre-authentication encoding: what the signature actually covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The subject digest: SHA-256 over the raw resource digests, concatenated in the order the
/// resources are listed (which is how the reference verifier recomputes it; its signer lists
/// them in [`super::manifest`]'s canonical order).
pub fn subject_digest(resources: &[Resource]) -> Result<String, hex::FromHexError> {
    let mut h = Sha256::new();
    for r in resources {
        h.update(hex::decode(&r.digest)?);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn b64_encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn b64_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    B64.decode(s)
}
