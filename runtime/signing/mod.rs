//! Model signing and verification in the OpenSSF model-signing format.
//!
//! Three ways to establish who signed, picked by the bundle's verification material:
//! - **key** (`publicKey`): a DER ECDSA signature by one of the operator's trusted public keys
//!   (P-256, P-384, P-521), built on RustCrypto because no Sigstore crate verifies these;
//! - **certificate** (`x509CertificateChain`): a chain to a CA the operator trusts
//!   ([`certificate`]);
//! - **keyless** (`certificate` + transparency-log entry): a Sigstore bundle verified offline
//!   against a trusted root with an identity/issuer policy ([`keyless`]).
//!
//! Whatever the mode, the signed in-toto statement is then checked the same way against the
//! model's files (`files` or `shards` serialization), hashing the bytes the loader holds.

pub mod bundle;
pub mod certificate;
pub mod keyless;
pub mod keys;
pub mod manifest;
pub mod progress;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bundle::{
    b64_decode, b64_encode, pae, subject_digest, Bundle, CertificateChain, Envelope,
    EnvelopeSignature, Predicate, PublicKeyHint, RawCertificate, Serialization, Statement, Subject,
    SubjectDigest, VerificationMaterial, BUNDLE_MEDIA_TYPE, DEFAULT_IGNORE, PAYLOAD_TYPE,
    PREDICATE_TYPE, STATEMENT_TYPE,
};
pub use certificate::{CertificateSigner, TrustedCas};
pub use keyless::{KeylessPolicy, KeylessSigner};
pub use keys::{PrivateKey, PublicKey};
pub use manifest::{Manifest, Method, Progress};

/// Largest signature file read (a bundle for thousands of files is well under this).
const MAX_BUNDLE: u64 = 16 * 1024 * 1024;
/// Smallest shard size accepted from a bundle: smaller ones would only make verification slow.
const MIN_SHARD: u64 = 4096;

/// Every way signing or verification fails; each says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(securerun_models::fsutil::OpenError),
    #[error("key: {0}")]
    Key(String),
    #[error("{0}: symbolic links are not allowed in a signed model")]
    Symlink(PathBuf),
    #[error("{0}: not a regular file or directory")]
    NotRegular(PathBuf),
    #[error("{0}: file name is not UTF-8")]
    NonUtf8Name(PathBuf),
    #[error("signature file is {len} bytes, over the {MAX_BUNDLE}-byte limit")]
    BundleTooLarge { len: u64 },
    #[error("signature file is not a valid bundle: {0}")]
    BundleJson(String),
    #[error("unsupported bundle mediaType {0:?} (expected {BUNDLE_MEDIA_TYPE})")]
    MediaType(String),
    #[error("the bundle is signed in {0} mode, but nothing is trusted for that mode (pass {1})")]
    NoTrustFor(&'static str, &'static str),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("keyless: {0}")]
    Keyless(String),
    #[error("unexpected DSSE payloadType {0:?} (expected {PAYLOAD_TYPE})")]
    PayloadType(String),
    #[error("the envelope has {0} signatures; exactly one is expected")]
    SignatureCount(usize),
    #[error("invalid base64 in the {0}")]
    Base64(&'static str),
    #[error("the bundle names key {bundle}, not a trusted key ({trusted})")]
    HintMismatch { bundle: String, trusted: String },
    #[error("the signature does not verify with any trusted key")]
    BadSignature,
    #[error("the signature does not verify with the signing certificate's key")]
    BadCertificateSignature,
    #[error("the signed payload is not a model-signing statement: {0}")]
    Statement(String),
    #[error("unsupported serialization {0:?}")]
    Serialization(String),
    #[error("the subject digest does not match the signed file list")]
    SubjectMismatch,
    #[error("signed resource {0:?} is listed twice")]
    DuplicateResource(String),
    #[error("{0:?} is signed but missing from the model")]
    MissingFile(String),
    #[error("{0:?} is in the model but not covered by the signature")]
    UnsignedFile(String),
    #[error("{0:?} does not match its signed digest (modified)")]
    DigestMismatch(String),
    #[error("{0}: the loader reads this file but the signature does not cover it (pack the model into one file, or sign the directory)")]
    UncoveredInput(PathBuf),
    #[error("internal error: {0}")]
    Internal(String),
}

impl SigningError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        SigningError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a small file (bundle, CA bundle, trusted root): no symlink, regular file, capped.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, SigningError> {
    securerun_models::fsutil::read_bounded(path, max).map_err(SigningError::File)
}

/// What the operator trusts to sign models. Empty means nothing verifies.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Key mode: trusted public keys.
    pub keys: Vec<PublicKey>,
    /// Certificate mode: CAs whose (code-signing) certificates are trusted.
    pub cas: TrustedCas,
    /// Keyless mode: the trusted identity, issuer and trust root.
    pub keyless: Option<KeylessPolicy>,
}

impl TrustPolicy {
    /// Trusts exactly these keys.
    pub fn keys(keys: Vec<PublicKey>) -> Self {
        TrustPolicy {
            keys,
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.cas.is_empty() && self.keyless.is_none()
    }
}

/// Who signed a verified model.
#[derive(Debug, Clone)]
pub enum Signer {
    Key { id: String, curve: &'static str },
    Certificate(CertificateSigner),
    Keyless(KeylessSigner),
}

impl Signer {
    /// `key`, `certificate` or `keyless`.
    pub fn mode(&self) -> &'static str {
        match self {
            Signer::Key { .. } => "key",
            Signer::Certificate(_) => "certificate",
            Signer::Keyless(_) => "keyless",
        }
    }
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Key { id, curve } => write!(f, "key {id} ({curve})"),
            Signer::Certificate(c) => write!(
                f,
                "certificate {:?} issued by {:?} (sha256 {})",
                c.subject, c.issuer, c.fingerprint
            ),
            Signer::Keyless(k) => write!(
                f,
                "{} via {} (logged {})",
                k.identity, k.issuer, k.signed_at
            ),
        }
    }
}

/// What a successful verification established.
#[derive(Debug)]
pub struct Verified {
    pub signer: Signer,
    pub method: Method,
    pub files: usize,
    pub bytes: u64,
}

/// Where a model's signature lives unless told: `model.sig` inside a directory, `FILE.sig`
/// beside a single file.
pub fn default_signature_path(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("model.sig")
    } else {
        let mut s = model.as_os_str().to_owned();
        s.push(".sig");
        PathBuf::from(s)
    }
}

fn model_name(model: &Path) -> String {
    std::fs::canonicalize(model)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| ".".into())
}

/// How to sign a model.
pub struct SignOptions<'a> {
    pub key: &'a PrivateKey,
    /// Certificate mode: the signing certificate for `key`, then the rest of its chain (DER).
    /// Empty for key mode.
    pub certificates: &'a [Vec<u8>],
    pub method: Method,
    pub progress: &'a dyn Progress,
}

/// Signs `model` in key mode with `files` serialization, returning the bundle JSON to write to
/// `signature`.
pub fn sign(
    model: &Path,
    key: &PrivateKey,
    signature: &Path,
) -> Result<(String, Manifest), SigningError> {
    sign_with(
        model,
        signature,
        &SignOptions {
            key,
            certificates: &[],
            method: Method::Files,
            progress: &(),
        },
    )
}

/// Signs `model` as `opts` says, returning the bundle JSON to write to `signature`.
pub fn sign_with(
    model: &Path,
    signature: &Path,
    opts: &SignOptions,
) -> Result<(String, Manifest), SigningError> {
    let verification_material = match opts.certificates.first() {
        None => VerificationMaterial {
            public_key: Some(PublicKeyHint {
                hint: Some(opts.key.public_key().hint()?),
            }),
            certificate: None,
            x509_certificate_chain: None,
            tlog_entries: Vec::new(),
        },
        Some(leaf) => {
            let cert_key = certificate::public_key_of(leaf)?;
            if cert_key.hint()? != opts.key.public_key().hint()? {
                return Err(SigningError::Certificate(
                    "the signing certificate is not for this private key".into(),
                ));
            }
            VerificationMaterial {
                public_key: None,
                certificate: None,
                x509_certificate_chain: Some(CertificateChain {
                    certificates: opts
                        .certificates
                        .iter()
                        .map(|der| RawCertificate {
                            raw_bytes: b64_encode(der),
                        })
                        .collect(),
                }),
                tlog_entries: Vec::new(),
            }
        }
    };
    let ignore: Vec<String> = DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect();
    let manifest = manifest::compute(model, opts.method, &ignore, signature, opts.progress)?;
    let statement = Statement {
        kind: STATEMENT_TYPE.into(),
        subject: vec![Subject {
            name: model_name(model),
            digest: SubjectDigest {
                sha256: subject_digest(&manifest.resources)
                    .map_err(|e| SigningError::Internal(e.to_string()))?,
            },
        }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Predicate {
            resources: manifest.resources.clone(),
            serialization: Serialization {
                method: match opts.method {
                    Method::Files => "files".into(),
                    Method::Shards { .. } => "shards".into(),
                },
                hash_type: "sha256".into(),
                shard_size: match opts.method {
                    Method::Files => None,
                    Method::Shards { size } => Some(size.into()),
                },
                allow_symlinks: false,
                ignore_paths: ignore,
            },
        },
    };
    let payload =
        serde_json::to_vec(&statement).map_err(|e| SigningError::Internal(e.to_string()))?;
    let sig = opts.key.sign(&pae(PAYLOAD_TYPE, &payload));
    let bundle = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.into(),
        verification_material,
        dsse_envelope: Envelope {
            payload: b64_encode(&payload),
            payload_type: PAYLOAD_TYPE.into(),
            signatures: vec![EnvelopeSignature {
                sig: b64_encode(&sig),
                keyid: String::new(),
            }],
        },
    };
    let json =
        serde_json::to_string_pretty(&bundle).map_err(|e| SigningError::Internal(e.to_string()))?;
    Ok((json, manifest))
}

/// Verifies `model` against the bundle at `signature`, signed by someone `trust` trusts.
pub fn verify(
    model: &Path,
    signature: &Path,
    trust: &TrustPolicy,
    progress: &dyn Progress,
) -> Result<Verified, SigningError> {
    verify_with(model, signature, trust, &|_| None, progress).map(|(v, _)| v)
}

/// Verifies an opened model: files the loader holds (weight mappings, configuration buffers)
/// are hashed from those very bytes, and every file the loader read must be covered by the
/// signature.
pub fn verify_source(
    source: &securerun_models::ModelSource,
    signature: &Path,
    trust: &TrustPolicy,
    progress: &dyn Progress,
) -> Result<Verified, SigningError> {
    use securerun_models::source::Origin;
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    // A file the loader read that no longer resolves (removed or renamed since) cannot be
    // matched to a signed name: it is refused, never skipped.
    let held_at = |p: &Path| {
        std::fs::canonicalize(p).map_err(|_| SigningError::UncoveredInput(p.to_path_buf()))
    };
    let mut held: Vec<(PathBuf, &[u8])> = Vec::new();
    for f in source.weight_files() {
        held.push((held_at(f.path())?, f.bytes()));
    }
    if let Some((path, bytes)) = source.index_file() {
        held.push((held_at(path)?, bytes));
    }
    for aux in source.aux_files().values() {
        if let Origin::File(path) = &aux.origin {
            held.push((held_at(path)?, &aux.bytes));
        }
    }
    let loaded = |path: &Path| {
        let p = canon(path)?;
        held.iter().find(|(h, _)| *h == p).map(|(_, b)| *b)
    };
    let (verified, covered) = verify_with(source.path(), signature, trust, &loaded, progress)?;
    // Every file the loader read must be among the verified ones.
    for (path, _) in &held {
        if !covered.contains(path) {
            return Err(SigningError::UncoveredInput(path.clone()));
        }
    }
    Ok(verified)
}

fn verify_with<'a>(
    model: &Path,
    signature: &Path,
    trust: &TrustPolicy,
    loaded: &(dyn Fn(&Path) -> Option<&'a [u8]> + Sync),
    progress: &dyn Progress,
) -> Result<(Verified, Vec<PathBuf>), SigningError> {
    let (raw, bundle) = read_bundle(signature)?;
    let (signer, payload) = authenticate(&raw, &bundle, trust)?;
    // Only now, with the payload authenticated, is it interpreted.
    let statement = parse_statement(&payload)?;
    let ser = &statement.predicate.serialization;
    let method = serialization_method(ser)?;
    let mut signed: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &statement.predicate.resources {
        if r.algorithm != method.algorithm() {
            return Err(SigningError::Serialization(format!(
                "resource algorithm {:?} (expected {:?})",
                r.algorithm,
                method.algorithm()
            )));
        }
        if signed.insert(&r.name, &r.digest).is_some() {
            return Err(SigningError::DuplicateResource(r.name.clone()));
        }
    }
    // Compare names before hashing anything: a renamed, added or removed file is reported
    // at once, and a model that cannot match is not read.
    let local_names = manifest::names(model, method, &ser.ignore_paths, signature)?;
    for name in &local_names {
        if !signed.contains_key(name.as_str()) {
            return Err(SigningError::UnsignedFile(file_of(name, method)));
        }
    }
    if let Some(name) = signed.keys().find(|n| !local_names.iter().any(|l| l == *n)) {
        return Err(SigningError::MissingFile(file_of(name, method)));
    }
    let local = manifest::compute_with(
        model,
        method,
        &ser.ignore_paths,
        signature,
        loaded,
        progress,
    )?;
    for r in &local.resources {
        match signed.get(r.name.as_str()) {
            Some(d) if d.eq_ignore_ascii_case(&r.digest) => {}
            _ => return Err(SigningError::DigestMismatch(file_of(&r.name, method))),
        }
    }
    let covered = local
        .resources
        .iter()
        .filter_map(|r| {
            let name = file_of(&r.name, method);
            let p = if name == "." {
                model.to_path_buf()
            } else {
                model.join(&name)
            };
            std::fs::canonicalize(p).ok()
        })
        .collect();
    let verified = Verified {
        signer,
        method,
        files: local.files,
        bytes: local.bytes,
    };
    Ok((verified, covered))
}

/// The file a resource name refers to (`path:start:end` for shards).
fn file_of(name: &str, method: Method) -> String {
    match method {
        Method::Files => name.to_string(),
        Method::Shards { .. } => name.rsplitn(3, ':').nth(2).unwrap_or(name).to_string(),
    }
}

fn parse_statement(payload: &[u8]) -> Result<Statement, SigningError> {
    let statement: Statement =
        serde_json::from_slice(payload).map_err(|e| SigningError::Statement(e.to_string()))?;
    if statement.kind != STATEMENT_TYPE {
        return Err(SigningError::Statement(format!(
            "_type {:?}",
            statement.kind
        )));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(SigningError::Statement(format!(
            "predicateType {:?}",
            statement.predicate_type
        )));
    }
    let [subject] = statement.subject.as_slice() else {
        return Err(SigningError::Statement(
            "expected exactly one subject".into(),
        ));
    };
    if subject_digest(&statement.predicate.resources)
        .ok()
        .as_deref()
        != Some(subject.digest.sha256.as_str())
    {
        return Err(SigningError::SubjectMismatch);
    }
    Ok(statement)
}

fn serialization_method(ser: &Serialization) -> Result<Method, SigningError> {
    let describe = || {
        format!(
            "method={} hash_type={} allow_symlinks={}",
            ser.method, ser.hash_type, ser.allow_symlinks
        )
    };
    if ser.hash_type != "sha256" || ser.allow_symlinks {
        return Err(SigningError::Serialization(describe()));
    }
    match ser.method.as_str() {
        "files" => Ok(Method::Files),
        "shards" => {
            // An integral JSON number, possibly written as a float (`1000000000.0`).
            let size = ser.shard_size.as_ref().and_then(|n| {
                n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= 2f64.powi(53))
                        .map(|f| f as u64)
                })
            });
            match size {
                Some(size) if size >= MIN_SHARD => Ok(Method::Shards { size }),
                _ => Err(SigningError::Serialization(format!(
                    "shard_size {:?} (an integer of at least {MIN_SHARD} is required)",
                    ser.shard_size
                ))),
            }
        }
        _ => Err(SigningError::Serialization(describe())),
    }
}

/// Returns the raw JSON (keyless verification re-parses it) and the parsed bundle.
fn read_bundle(path: &Path) -> Result<(String, Bundle), SigningError> {
    let bytes = securerun_models::fsutil::read_bounded(path, MAX_BUNDLE).map_err(|e| match e {
        securerun_models::fsutil::OpenError::TooLarge { len, .. } => {
            SigningError::BundleTooLarge { len }
        }
        other => SigningError::File(other),
    })?;
    let raw = String::from_utf8(bytes)
        .map_err(|_| SigningError::BundleJson("the file is not UTF-8".into()))?;
    let value: serde_json::Value =
        serde_json::from_str(&raw).map_err(|e| SigningError::BundleJson(e.to_string()))?;
    let media = value
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    if media != BUNDLE_MEDIA_TYPE {
        return Err(SigningError::MediaType(media.to_string()));
    }
    let bundle =
        serde_json::from_value(value).map_err(|e| SigningError::BundleJson(e.to_string()))?;
    Ok((raw, bundle))
}

/// Establishes who signed the envelope, by the mode the bundle's verification material names,
/// and returns the authenticated payload.
fn authenticate(
    raw: &str,
    bundle: &Bundle,
    trust: &TrustPolicy,
) -> Result<(Signer, Vec<u8>), SigningError> {
    let env = &bundle.dsse_envelope;
    if env.payload_type != PAYLOAD_TYPE {
        return Err(SigningError::PayloadType(env.payload_type.clone()));
    }
    let [sig] = env.signatures.as_slice() else {
        return Err(SigningError::SignatureCount(env.signatures.len()));
    };
    let payload = b64_decode(&env.payload).map_err(|_| SigningError::Base64("payload"))?;
    let der = b64_decode(&sig.sig).map_err(|_| SigningError::Base64("signature"))?;
    let message = pae(&env.payload_type, &payload);
    let vm = &bundle.verification_material;
    match (&vm.public_key, &vm.x509_certificate_chain, &vm.certificate) {
        (Some(hint), None, None) => {
            let key = check_key_signature(&message, &der, hint.hint.as_deref(), &trust.keys)?;
            let signer = Signer::Key {
                id: key.hint()?,
                curve: key.curve(),
            };
            Ok((signer, payload))
        }
        (None, Some(chain), None) => {
            let signer = certificate::verify_chain(chain, &trust.cas)?;
            if !signer.key.verify(&message, &der) {
                return Err(SigningError::BadCertificateSignature);
            }
            Ok((Signer::Certificate(signer), payload))
        }
        (None, None, Some(_)) => {
            let Some(policy) = &trust.keyless else {
                return Err(SigningError::NoTrustFor(
                    "keyless",
                    "--identity and --issuer (and --trusted-root for a private Sigstore)",
                ));
            };
            // The digest sigstore-verify binds the envelope to; the statement itself is
            // re-checked after authentication like in every mode.
            let statement: Statement = serde_json::from_slice(&payload)
                .map_err(|e| SigningError::Statement(e.to_string()))?;
            let digest = subject_digest(&statement.predicate.resources)
                .map_err(|_| SigningError::SubjectMismatch)?;
            let signer = keyless::verify(raw, &digest, policy)?;
            Ok((Signer::Keyless(signer), payload))
        }
        (None, None, None) => Err(SigningError::BundleJson("no verification material".into())),
        _ => Err(SigningError::BundleJson(
            "more than one kind of verification material".into(),
        )),
    }
}

/// Key mode: the one signature must verify with a trusted key (the bundle's hint, if any,
/// must name it).
fn check_key_signature(
    message: &[u8],
    der: &[u8],
    hint: Option<&str>,
    trusted: &[PublicKey],
) -> Result<PublicKey, SigningError> {
    if trusted.is_empty() {
        return Err(SigningError::NoTrustFor("key", "--trust-key PUB"));
    }
    let mut hints = Vec::new();
    for key in trusted {
        let key_hint = key.hint()?;
        if hint.is_some_and(|h| !h.eq_ignore_ascii_case(&key_hint)) {
            hints.push(key_hint);
            continue;
        }
        if key.verify(message, der) {
            return Ok(key.clone());
        }
    }
    match hint {
        Some(h) if hints.len() == trusted.len() => Err(SigningError::HintMismatch {
            bundle: h.to_string(),
            trusted: hints.join(", "),
        }),
        _ => Err(SigningError::BadSignature),
    }
}
