//! Model signing: interoperability with the reference OpenSSF `model_signing` CLI in both
//! directions on the real models, and a tamper suite where each manipulation is refused with its
//! own error. The reference CLI comes from `scripts/test.sh` (or $SECURERUN_MODEL_SIGNING).

mod common;

use common::{p, reference_cli, securerun};

use std::path::{Path, PathBuf};
use std::process::Command;

use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use securerun::signing::{self, bundle, PrivateKey, PublicKey, SigningError, TrustPolicy};

/// Writes a PKCS#8 private key and SPKI public key for `curve`; returns their paths.
fn keypair(dir: &Path, curve: &str) -> (PathBuf, PathBuf) {
    let rng = &mut rand_core::OsRng;
    let (private, public) = match curve {
        "P-256" => {
            let k = p256::SecretKey::random(rng);
            (
                k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
                k.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            )
        }
        "P-384" => {
            let k = p384::SecretKey::random(rng);
            (
                k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
                k.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            )
        }
        _ => {
            let k = p521::SecretKey::random(rng);
            (
                k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
                k.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            )
        }
    };
    let key = dir.join(format!("{curve}.key"));
    let public_path = dir.join(format!("{curve}.pub"));
    std::fs::write(&key, private).unwrap();
    std::fs::write(&public_path, public).unwrap();
    (key, public_path)
}

fn reference_sign(key: &Path, sig: &Path, model: &Path) {
    let o = Command::new(reference_cli())
        .args([
            "sign",
            "key",
            "--private_key",
            p(key),
            "--signature",
            p(sig),
            p(model),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "reference sign failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn reference_verify(public: &Path, sig: &Path, model: &Path) -> bool {
    Command::new(reference_cli())
        .args([
            "verify",
            "key",
            "--public_key",
            p(public),
            "--signature",
            p(sig),
            p(model),
        ])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn reference_signed_real_model_verifies_on_every_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("minilm");
    common::copy_dir(&common::minilm(), &model);
    for curve in ["P-256", "P-384", "P-521"] {
        let (key, public) = keypair(tmp.path(), curve);
        let sig = tmp.path().join(format!("{curve}.sig"));
        reference_sign(&key, &sig, &model);
        let o = securerun(&[
            "verify",
            p(&model),
            "--trust-key",
            p(&public),
            "--signature",
            p(&sig),
        ]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{curve}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains(curve) && out.contains("mode key"), "{out}");
    }
}

#[test]
fn securerun_signatures_verify_with_the_reference_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("site");
    let o = securerun(&["keygen", "--out", p(&prefix)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = tmp.path().join("site.key");
    let public = tmp.path().join("site.pub");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // keygen never overwrites silently.
    assert!(!securerun(&["keygen", "--out", p(&prefix)]).status.success());
    // --force replaces the files: the new private key is 0600 even if the old file was not.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(securerun(&["keygen", "--out", p(&prefix), "--force"])
        .status
        .success());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A directory, with the default signature path inside it.
    let model = tmp.path().join("minilm");
    common::copy_dir(&common::minilm(), &model);
    let o = securerun(&["sign", p(&model), "--key", p(&key)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(reference_verify(&public, &model.join("model.sig"), &model));
    assert!(securerun(&["verify", p(&model), "--trust-key", p(&public)])
        .status
        .success());

    // A single packed file (weights + config + tokenizer + chat template in one signed file).
    let packed = tmp.path().join("smollm2.safetensors");
    assert!(
        securerun(&["pack", p(&common::smollm2()), "--out", p(&packed)])
            .status
            .success()
    );
    assert!(securerun(&["sign", p(&packed), "--key", p(&key)])
        .status
        .success());
    let sig = tmp.path().join("smollm2.safetensors.sig");
    assert!(reference_verify(&public, &sig, &packed));
    assert!(
        securerun(&["verify", p(&packed), "--trust-key", p(&public)])
            .status
            .success()
    );
}

/// A small signed model for the tamper cases.
struct Signed {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    sig: PathBuf,
    key: PrivateKey,
    public: PublicKey,
}

fn signed() -> Signed {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    std::fs::create_dir_all(model.join("sub")).unwrap();
    std::fs::write(model.join("config.json"), "{\"model_type\":\"llama\"}").unwrap();
    std::fs::write(model.join("model.safetensors"), vec![7u8; 4096]).unwrap();
    std::fs::write(model.join("sub/tokenizer.json"), "{}").unwrap();
    let sig = tmp.path().join("m.sig");
    let key = PrivateKey::generate_p256();
    let (json, _) = signing::sign(&model, &key, &sig).unwrap();
    std::fs::write(&sig, json).unwrap();
    let public = key.public_key();
    Signed {
        _tmp: tmp,
        model,
        sig,
        key,
        public,
    }
}

impl Signed {
    fn verify(&self) -> Result<signing::Verified, SigningError> {
        signing::verify(
            &self.model,
            &self.sig,
            &TrustPolicy::keys(vec![self.public.clone()]),
            &(),
        )
    }

    fn edit_bundle(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.sig).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&self.sig, v.to_string()).unwrap();
    }

    /// Rewrites the signed statement (keeping the old signature, or re-signing with `key`).
    fn edit_statement(&self, resign: Option<&PrivateKey>, f: impl FnOnce(&mut serde_json::Value)) {
        self.edit_bundle(|b| {
            let payload =
                bundle::b64_decode(b["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap();
            let mut st: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            f(&mut st);
            let payload = serde_json::to_vec(&st).unwrap();
            b["dsseEnvelope"]["payload"] = bundle::b64_encode(&payload).into();
            if let Some(k) = resign {
                let sig = k.sign(&bundle::pae(bundle::PAYLOAD_TYPE, &payload));
                b["dsseEnvelope"]["signatures"][0]["sig"] = bundle::b64_encode(&sig).into();
            }
        });
    }
}

#[test]
fn untampered_model_verifies() {
    let s = signed();
    let v = s.verify().unwrap();
    assert_eq!(v.files, 3);
    assert_eq!(v.bytes, 4096 + 22 + 2);
}

#[test]
fn flipped_byte_in_each_file_is_detected() {
    for name in ["config.json", "model.safetensors", "sub/tokenizer.json"] {
        let s = signed();
        let path = s.model.join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        match s.verify() {
            Err(SigningError::DigestMismatch(n)) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn renamed_added_removed_files_are_detected() {
    let s = signed();
    std::fs::rename(s.model.join("config.json"), s.model.join("config2.json")).unwrap();
    assert!(matches!(s.verify(), Err(SigningError::UnsignedFile(n)) if n == "config2.json"));

    let s = signed();
    std::fs::write(s.model.join("extra.bin"), "x").unwrap();
    assert!(matches!(s.verify(), Err(SigningError::UnsignedFile(n)) if n == "extra.bin"));

    let s = signed();
    std::fs::remove_file(s.model.join("sub/tokenizer.json")).unwrap();
    assert!(matches!(s.verify(), Err(SigningError::MissingFile(n)) if n == "sub/tokenizer.json"));

    let s = signed();
    std::fs::remove_file(s.model.join("config.json")).unwrap();
    std::os::unix::fs::symlink(
        s.model.join("model.safetensors"),
        s.model.join("config.json"),
    )
    .unwrap();
    assert!(matches!(s.verify(), Err(SigningError::Symlink(_))));
}

#[test]
fn edited_statements_are_refused() {
    // Payload edited, old signature kept.
    let s = signed();
    s.edit_statement(None, |st| {
        st["predicate"]["resources"][0]["digest"] = "00".repeat(32).into()
    });
    assert!(matches!(s.verify(), Err(SigningError::BadSignature)));

    // Subject digest edited and re-signed (a signer bug or a crafted bundle): inconsistent.
    let s = signed();
    let key = PrivateKey::from_pem(&s.key.to_pem().unwrap()).unwrap();
    s.edit_statement(Some(&key), |st| {
        st["subject"][0]["digest"]["sha256"] = "11".repeat(32).into()
    });
    assert!(matches!(s.verify(), Err(SigningError::SubjectMismatch)));

    // Predicate type and serialization.
    let s = signed();
    s.edit_statement(Some(&key_of(&s)), |st| {
        st["predicateType"] = "https://example/other".into()
    });
    assert!(matches!(s.verify(), Err(SigningError::Statement(_))));
    let s = signed();
    s.edit_statement(Some(&key_of(&s)), |st| {
        st["predicate"]["serialization"]["allow_symlinks"] = true.into()
    });
    assert!(matches!(s.verify(), Err(SigningError::Serialization(_))));
}

fn key_of(s: &Signed) -> PrivateKey {
    PrivateKey::from_pem(&s.key.to_pem().unwrap()).unwrap()
}

#[test]
fn envelope_and_bundle_manipulations_are_refused() {
    let s = signed();
    s.edit_bundle(|b| b["dsseEnvelope"]["payloadType"] = "text/plain".into());
    assert!(matches!(s.verify(), Err(SigningError::PayloadType(_))));

    let s = signed();
    s.edit_bundle(|b| b["mediaType"] = "application/vnd.dev.sigstore.bundle.v0.2+json".into());
    assert!(matches!(s.verify(), Err(SigningError::MediaType(_))));

    let s = signed();
    s.edit_bundle(|b| {
        let sigs = b["dsseEnvelope"]["signatures"].clone();
        b["dsseEnvelope"]["signatures"] = serde_json::json!([sigs[0], sigs[0]]);
    });
    assert!(matches!(s.verify(), Err(SigningError::SignatureCount(2))));

    let s = signed();
    s.edit_bundle(|b| {
        b["verificationMaterial"] =
            serde_json::json!({"certificate": {"rawBytes": "AAAA"}, "tlogEntries": []});
    });
    // A keyless bundle when only keys are trusted: refused, naming what would be needed.
    assert!(matches!(
        s.verify(),
        Err(SigningError::NoTrustFor("keyless", _))
    ));

    let s = signed();
    let full = std::fs::read(&s.sig).unwrap();
    std::fs::write(&s.sig, &full[..full.len() / 2]).unwrap();
    assert!(matches!(s.verify(), Err(SigningError::BundleJson(_))));
    std::fs::write(&s.sig, "not json at all").unwrap();
    assert!(matches!(s.verify(), Err(SigningError::BundleJson(_))));
    std::fs::write(&s.sig, vec![b' '; 17 * 1024 * 1024]).unwrap();
    assert!(matches!(
        s.verify(),
        Err(SigningError::BundleTooLarge { .. })
    ));
}

#[test]
fn another_key_is_not_trusted() {
    let s = signed();
    let stranger = PrivateKey::generate_p256().public_key();
    let r = signing::verify(&s.model, &s.sig, &TrustPolicy::keys(vec![stranger]), &());
    assert!(matches!(r, Err(SigningError::HintMismatch { .. })), "{r:?}");
    // Without a hint in the bundle, the signature itself fails.
    s.edit_bundle(|b| b["verificationMaterial"]["publicKey"] = serde_json::json!({}));
    let stranger = PrivateKey::generate_p256().public_key();
    assert!(matches!(
        signing::verify(&s.model, &s.sig, &TrustPolicy::keys(vec![stranger]), &()),
        Err(SigningError::BadSignature)
    ));
    // And the CLI says so in one line with a non-zero exit.
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("k.pub");
    std::fs::write(
        &public,
        PrivateKey::generate_p256().public_key().to_pem().unwrap(),
    )
    .unwrap();
    let o = securerun(&[
        "verify",
        p(&s.model),
        "--trust-key",
        p(&public),
        "--signature",
        p(&s.sig),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("does not verify with any trusted key"),
        "{err}"
    );
}

/// The one open path of the library (and of `run`, `embed` and `serve`): a signed real model
/// opens, once, to one value that carries what verified it, what it is and how it will run;
/// its task is enforced with a typed error, and the memory budget a worker gets is the one
/// computed from the verified weights (or the one asked for).
#[test]
fn a_model_opens_once_to_one_verified_value() {
    use securerun::models::{Architecture, Precision, Task};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("minilm");
    common::copy_dir(&common::minilm(), &model);
    let sig = tmp.path().join("minilm.sig");
    let key = PrivateKey::generate_p256();
    let (json, _) = signing::sign(&model, &key, &sig).unwrap();
    std::fs::write(&sig, json).unwrap();
    let opts = securerun::OpenOptions {
        trust: TrustPolicy::keys(vec![key.public_key()]),
        signature: Some(sig.clone()),
        ..Default::default()
    };

    let opened = securerun::open(&model, &opts).unwrap();
    let v = opened.verification().expect("verified");
    assert_eq!(v.signer.mode(), "key");
    assert_eq!(opened.architecture(), Architecture::Bert);
    assert_eq!(opened.task(), Task::Embeddings);
    // `auto` keeps an encoder at f32; an explicit precision is kept.
    assert_eq!(opened.precision(), Precision::Auto);
    assert_eq!(opened.run_precision(), Precision::F32);
    let weights = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(opened.source().weight_bytes() > weights * 9 / 10);
    assert_eq!(
        opened.memory_budget(),
        securerun::worker::supervisor::default_memory_budget(opened.source().weight_bytes())
    );

    // The wrong task is refused by type, before anything loads.
    match opened.text_model() {
        Err(securerun::Error::WrongTask {
            found: Task::Embeddings,
            wanted: Task::TextGeneration,
            ..
        }) => {}
        Err(e) => panic!("expected WrongTask, got {e}"),
        Ok(_) => panic!("an encoder loaded as a text model"),
    }
    // The right one loads from the same verified bytes.
    let vectors = opened
        .embedder()
        .unwrap()
        .embed(&["hello".to_string()])
        .unwrap();
    assert_eq!(vectors[0].len(), 384);

    // A budget asked for is the one the worker is held to: too small is refused before any
    // worker starts, naming the budget.
    let small = securerun::OpenOptions {
        memory_budget: Some(64 << 20),
        precision: Precision::Q8_0,
        ..opts.clone()
    };
    let opened = securerun::open(&model, &small).unwrap();
    assert_eq!(opened.memory_budget(), 64 << 20);
    assert_eq!(opened.run_precision(), Precision::Q8_0);
    let mut settings = securerun::worker::WorkerSettings::new().unwrap();
    settings.program = tmp.path().join("no-worker");
    match opened.confined(settings) {
        Err(securerun::Error::Worker(e)) => {
            assert!(e.to_string().contains("budget of 64 MiB"), "{e}")
        }
        Err(e) => panic!("expected the budget refusal, got {e}"),
        Ok(_) => panic!("a worker started over its budget"),
    }

    // One changed byte after signing: the model never opens.
    let tokenizer = model.join("tokenizer.json");
    let mut bytes = std::fs::read(&tokenizer).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&tokenizer, bytes).unwrap();
    assert!(matches!(
        securerun::open(&model, &opts),
        Err(securerun::Error::Verification { .. })
    ));
}
