//! Model signing and verification in the OpenSSF model-signing format (key mode).
//!
//! `sign` writes what `model_signing sign key` writes; `verify` accepts what it writes (P-256,
//! P-384, P-521). Certificate and keyless (Sigstore) bundles are recognised and refused with a
//! clear error until they are supported.

pub mod bundle;
pub mod keys;
pub mod manifest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bundle::{
    b64_decode, b64_encode, pae, subject_digest, Bundle, Envelope, EnvelopeSignature, Predicate,
    PublicKeyHint, Serialization, Statement, Subject, SubjectDigest, VerificationMaterial,
    BUNDLE_MEDIA_TYPE, DEFAULT_IGNORE, PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE,
};
pub use keys::{PrivateKey, PublicKey};
pub use manifest::Manifest;

/// Largest signature file read (a key-mode bundle for thousands of files is well under this).
const MAX_BUNDLE: u64 = 16 * 1024 * 1024;

/// Every way signing or verification fails; each says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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
    #[error(
        "the bundle is signed with a {0}; only key-mode (public key) bundles are supported so far"
    )]
    UnsupportedMode(&'static str),
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

/// Signs `model`, returning the bundle JSON to write to `signature`.
pub fn sign(
    model: &Path,
    key: &PrivateKey,
    signature: &Path,
) -> Result<(String, Manifest), SigningError> {
    let ignore: Vec<String> = DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect();
    let manifest = manifest::compute(model, &ignore, signature)?;
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
                method: "files".into(),
                hash_type: "sha256".into(),
                allow_symlinks: false,
                ignore_paths: ignore,
            },
        },
    };
    let payload =
        serde_json::to_vec(&statement).map_err(|e| SigningError::Internal(e.to_string()))?;
    let sig = key.sign(&pae(PAYLOAD_TYPE, &payload));
    let bundle = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.into(),
        verification_material: VerificationMaterial {
            public_key: Some(PublicKeyHint {
                hint: Some(key.public_key().hint()?),
            }),
            certificate: None,
            x509_certificate_chain: None,
            tlog_entries: Vec::new(),
        },
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

/// What a successful verification established.
#[derive(Debug)]
pub struct Verified {
    pub signer_hint: String,
    pub curve: &'static str,
    pub files: usize,
    pub bytes: u64,
}

/// Verifies `model` against the bundle at `signature`, signed by one of `trusted`.
pub fn verify(
    model: &Path,
    signature: &Path,
    trusted: &[PublicKey],
) -> Result<Verified, SigningError> {
    verify_with(model, signature, trusted, &|_| None).map(|(v, _)| v)
}

/// Verifies an opened model: files the loader holds (weight mappings, configuration buffers)
/// are hashed from those very bytes, and every file the loader read must be covered by the
/// signature.
pub fn verify_source(
    source: &securerun_models::ModelSource,
    signature: &Path,
    trusted: &[PublicKey],
) -> Result<Verified, SigningError> {
    use securerun_models::source::Origin;
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let mut held: Vec<(PathBuf, &[u8])> = Vec::new();
    for f in source.weight_files() {
        if let Some(p) = canon(f.path()) {
            held.push((p, f.bytes()));
        }
    }
    if let Some((path, bytes)) = source.index_file() {
        if let Some(p) = canon(path) {
            held.push((p, bytes));
        }
    }
    for aux in source.aux_files().values() {
        if let Origin::File(path) = &aux.origin {
            if let Some(p) = canon(path) {
                held.push((p, &aux.bytes));
            }
        }
    }
    let loaded = |path: &Path| {
        let p = canon(path)?;
        held.iter().find(|(h, _)| *h == p).map(|(_, b)| *b)
    };
    let (verified, covered) = verify_with(source.path(), signature, trusted, &loaded)?;
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
    trusted: &[PublicKey],
    loaded: &(dyn Fn(&Path) -> Option<&'a [u8]> + Sync),
) -> Result<(Verified, Vec<PathBuf>), SigningError> {
    let bundle = read_bundle(signature)?;
    let (key, payload) = check_envelope(&bundle, trusted)?;
    let statement: Statement =
        serde_json::from_slice(&payload).map_err(|e| SigningError::Statement(e.to_string()))?;
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
    let ser = &statement.predicate.serialization;
    if ser.method != "files" || ser.hash_type != "sha256" || ser.allow_symlinks {
        return Err(SigningError::Serialization(format!(
            "method={} hash_type={} allow_symlinks={}",
            ser.method, ser.hash_type, ser.allow_symlinks
        )));
    }
    let resources = &statement.predicate.resources;
    let [subject] = statement.subject.as_slice() else {
        return Err(SigningError::Statement(
            "expected exactly one subject".into(),
        ));
    };
    if subject_digest(resources).ok().as_deref() != Some(subject.digest.sha256.as_str()) {
        return Err(SigningError::SubjectMismatch);
    }
    let mut signed: BTreeMap<&str, &str> = BTreeMap::new();
    for r in resources {
        if r.algorithm != "sha256" {
            return Err(SigningError::Serialization(format!(
                "resource algorithm {:?}",
                r.algorithm
            )));
        }
        if signed.insert(&r.name, &r.digest).is_some() {
            return Err(SigningError::DuplicateResource(r.name.clone()));
        }
    }
    let local = manifest::compute_with(model, &ser.ignore_paths, signature, loaded)?;
    for r in &local.resources {
        match signed.remove(r.name.as_str()) {
            None => return Err(SigningError::UnsignedFile(r.name.clone())),
            Some(d) if !d.eq_ignore_ascii_case(&r.digest) => {
                return Err(SigningError::DigestMismatch(r.name.clone()))
            }
            Some(_) => {}
        }
    }
    if let Some(name) = signed.keys().next() {
        return Err(SigningError::MissingFile(name.to_string()));
    }
    let covered = local
        .resources
        .iter()
        .filter_map(|r| {
            let p = if r.name == "." {
                model.to_path_buf()
            } else {
                model.join(&r.name)
            };
            std::fs::canonicalize(p).ok()
        })
        .collect();
    let verified = Verified {
        signer_hint: key.hint()?,
        curve: key.curve(),
        files: local.resources.len(),
        bytes: local.bytes,
    };
    Ok((verified, covered))
}

fn read_bundle(path: &Path) -> Result<Bundle, SigningError> {
    let len = std::fs::metadata(path)
        .map_err(|e| SigningError::io(path, e))?
        .len();
    if len > MAX_BUNDLE {
        return Err(SigningError::BundleTooLarge { len });
    }
    let mut bytes = Vec::new();
    // `take` bounds the read even if the file grows after the size check.
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(|e| SigningError::io(path, e))?,
            MAX_BUNDLE + 1,
        ),
        &mut bytes,
    )
    .map_err(|e| SigningError::io(path, e))?;
    if bytes.len() as u64 > MAX_BUNDLE {
        return Err(SigningError::BundleTooLarge {
            len: bytes.len() as u64,
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| SigningError::BundleJson(e.to_string()))?;
    let media = value
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    if media != BUNDLE_MEDIA_TYPE {
        return Err(SigningError::MediaType(media.to_string()));
    }
    serde_json::from_value(value).map_err(|e| SigningError::BundleJson(e.to_string()))
}

/// Checks the envelope and its one signature against the trusted keys; returns the key that
/// verified and the decoded payload.
fn check_envelope(
    bundle: &Bundle,
    trusted: &[PublicKey],
) -> Result<(PublicKey, Vec<u8>), SigningError> {
    let vm = &bundle.verification_material;
    if vm.public_key.is_none() {
        if vm.certificate.is_some() || vm.x509_certificate_chain.is_some() {
            return Err(SigningError::UnsupportedMode("certificate"));
        }
        return Err(SigningError::BundleJson("no verification material".into()));
    }
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
    let hint = vm.public_key.as_ref().and_then(|k| k.hint.clone());
    let mut hints = Vec::new();
    for key in trusted {
        let key_hint = key.hint()?;
        if hint
            .as_ref()
            .is_some_and(|h| !h.eq_ignore_ascii_case(&key_hint))
        {
            hints.push(key_hint);
            continue;
        }
        if key.verify(&message, &der) {
            return Ok((key.clone(), payload));
        }
    }
    match hint {
        Some(h) if hints.len() == trusted.len() && !trusted.is_empty() => {
            Err(SigningError::HintMismatch {
                bundle: h,
                trusted: hints.join(", "),
            })
        }
        _ => Err(SigningError::BadSignature),
    }
}
