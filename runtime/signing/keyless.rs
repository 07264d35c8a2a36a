//! Keyless (Sigstore) mode, verified offline: the bundle carries a short-lived Fulcio
//! certificate naming the signer's OIDC identity, and a Rekor transparency-log entry with its
//! inclusion proof and signed timestamp. `sigstore-verify` checks all of it against a
//! `trusted_root.json` (Fulcio CAs, Rekor and CT log keys) without any network access: the
//! certificate chain at the logged signing time, the SCT, the log inclusion proof and
//! checkpoint, the entry's consistency with this envelope, the DSSE signature, and the
//! operator's identity/issuer policy. The model's files are then checked against the statement
//! by the caller, exactly as in the other modes.

use std::path::Path;
use std::sync::Arc;

use sigstore_verify::trust_root::{TrustedRoot, SIGSTORE_PRODUCTION_TRUSTED_ROOT};
use sigstore_verify::types::{Bundle, Sha256Hash};
use sigstore_verify::{IdentityMatcher, VerificationPolicy, Verifier};

use super::SigningError;

/// Largest trusted_root.json read.
const MAX_TRUSTED_ROOT: u64 = 4 * 1024 * 1024;

/// Which signer identities are trusted, and the trust root that vouches for them.
#[derive(Clone)]
pub struct KeylessPolicy {
    identity: String,
    issuer: String,
    root: String,
    verifier: Arc<Verifier>,
}

impl std::fmt::Debug for KeylessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeylessPolicy")
            .field("identity", &self.identity)
            .field("issuer", &self.issuer)
            .field("root", &self.root)
            .finish()
    }
}

/// Who signed, as established by a verified keyless bundle.
#[derive(Debug, Clone)]
pub struct KeylessSigner {
    pub identity: String,
    pub issuer: String,
    /// When the transparency log (or a timestamp authority) saw the signature, RFC 3339.
    pub signed_at: String,
}

impl KeylessPolicy {
    /// Trusts signatures by `identity` (the certificate's email or URI SAN, exactly) as
    /// vouched for by `issuer` (the OIDC issuer URL, exactly). `trusted_root` is a Sigstore
    /// `trusted_root.json`; without one, the Sigstore public-good root built into this binary
    /// is used.
    pub fn new(
        identity: &str,
        issuer: &str,
        trusted_root: Option<&Path>,
    ) -> Result<Self, SigningError> {
        if identity.is_empty() || issuer.is_empty() {
            return Err(SigningError::Keyless(
                "keyless verification needs both an identity and an issuer".into(),
            ));
        }
        let (json, root) = match trusted_root {
            Some(path) => {
                let bytes = super::read_bounded(path, MAX_TRUSTED_ROOT)?;
                let json = String::from_utf8(bytes)
                    .map_err(|_| SigningError::Keyless(format!("{}: not UTF-8", path.display())))?;
                (json, path.display().to_string())
            }
            None => (
                SIGSTORE_PRODUCTION_TRUSTED_ROOT.to_string(),
                "built-in Sigstore public-good root".to_string(),
            ),
        };
        let parsed = TrustedRoot::from_json(&json)
            .map_err(|e| SigningError::Keyless(format!("{root}: invalid trusted root: {e}")))?;
        let verifier = Verifier::new(&parsed)
            .map_err(|e| SigningError::Keyless(format!("{root}: unusable trusted root: {e}")))?;
        Ok(KeylessPolicy {
            identity: identity.to_string(),
            issuer: issuer.to_string(),
            root,
            verifier: Arc::new(verifier),
        })
    }
}

/// Verifies a keyless bundle (given as its raw JSON) whose statement's resources hash to
/// `subject_digest`.
pub fn verify(
    bundle_json: &str,
    subject_digest: &str,
    policy: &KeylessPolicy,
) -> Result<KeylessSigner, SigningError> {
    let bundle = Bundle::from_json(bundle_json)
        .map_err(|e| SigningError::Keyless(format!("the bundle is not a Sigstore bundle: {e}")))?;
    let digest = Sha256Hash::from_hex(subject_digest)
        .map_err(|e| SigningError::Keyless(format!("subject digest: {e}")))?;
    let rule = VerificationPolicy::new(
        IdentityMatcher::Exact(policy.identity.clone()),
        policy.issuer.clone(),
    );
    let result = policy
        .verifier
        .verify(digest, &bundle, &rule)
        .map_err(|e| SigningError::Keyless(e.to_string()))?;
    Ok(KeylessSigner {
        identity: result
            .identity()
            .map_or_else(|| policy.identity.clone(), |i| i.as_str().to_string()),
        issuer: result
            .issuer()
            .map_or_else(|| policy.issuer.clone(), str::to_string),
        signed_at: result
            .integrated_time()
            .or_else(|| result.verified_timestamps().first().copied())
            .map_or_else(|| "unknown time".into(), |t| t.to_string()),
    })
}
