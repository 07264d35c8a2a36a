//! Certificate, keyless and sharded signatures: interoperability with the reference OpenSSF
//! `model_signing` implementation on a real model, a real public Sigstore keyless bundle verified
//! offline, and each way a certificate can be wrong refused with its own error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{p, reference_cli, securerun};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use securerun::signing::{self, Method, PrivateKey, SignOptions, SigningError, TrustPolicy};

// ---------------------------------------------------------------------------------------------
// A small PKI: root CA -> intermediate CA -> code-signing leaf.

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn leaf_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    params
}

struct Pki {
    dir: tempfile::TempDir,
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        Self::named("Test")
    }

    fn named(org: &str) -> Self {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{org} Root CA")),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{org} Intermediate CA")),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            root,
            intermediate,
        };
        std::fs::write(pki.path("root.pem"), pki.root.pem()).unwrap();
        std::fs::write(pki.path("intermediate.pem"), pki.intermediate.pem()).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a leaf from the intermediate; writes NAME.key (PKCS#8) and NAME.pem.
    fn leaf(&self, name: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.intermediate).unwrap();
        let (key_path, cert_path) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.pem")),
        );
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&cert_path, cert.pem()).unwrap();
        (key_path, cert_path)
    }

    fn trust_root(&self) -> TrustPolicy {
        let mut trust = TrustPolicy::default();
        trust.cas.add_pem_file(&self.path("root.pem")).unwrap();
        trust
    }
}

/// Signs `model` in certificate mode with securerun's library (leaf + intermediate in the bundle).
fn sign_with_certificate(model: &Path, sig: &Path, key: &Path, cert: &Path, pki: &Pki) {
    let key = PrivateKey::from_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
    let mut certificates = signing::certificate::read_pem_certificates(cert).unwrap();
    certificates.extend(
        signing::certificate::read_pem_certificates(&pki.path("intermediate.pem")).unwrap(),
    );
    let opts = SignOptions {
        key: &key,
        certificates: &certificates,
        method: Method::Files,
        progress: &(),
    };
    let (json, _) = signing::sign_with(model, sig, &opts).unwrap();
    std::fs::write(sig, json).unwrap();
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("m");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), "{\"model_type\":\"llama\"}").unwrap();
    std::fs::write(model.join("model.safetensors"), vec![3u8; 10_000]).unwrap();
    model
}

fn run_reference(args: &[&str]) -> std::process::Output {
    Command::new(reference_cli()).args(args).output().unwrap()
}

#[test]
fn certificate_mode_interoperates_with_the_reference_cli_and_runs() {
    let pki = Pki::new();
    let (key, cert) = pki.leaf("signer", leaf_params("model signer"));
    let model = common::minilm();

    // Reference signs (leaf + intermediate in the bundle); securerun verifies against the root.
    let theirs = pki.path("theirs.sig");
    let o = run_reference(&[
        "sign",
        "certificate",
        "--private_key",
        p(&key),
        "--signing_certificate",
        p(&cert),
        "--certificate_chain",
        p(&pki.path("intermediate.pem")),
        "--signature",
        p(&theirs),
        p(&model),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = securerun(&[
        "verify",
        p(&model),
        "--trust-ca",
        p(&pki.path("root.pem")),
        "--signature",
        p(&theirs),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("mode certificate") && out.contains("CN=model signer"),
        "{out}"
    );

    // securerun signs; the reference verifies against the root.
    let ours = pki.path("ours.sig");
    let o = securerun(&[
        "sign",
        p(&model),
        "--key",
        p(&key),
        "--certificate",
        p(&cert),
        "--certificate-chain",
        p(&pki.path("intermediate.pem")),
        "--signature",
        p(&ours),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run_reference(&[
        "verify",
        "certificate",
        "--certificate_chain",
        p(&pki.path("root.pem")),
        "--signature",
        p(&ours),
        p(&model),
    ]);
    assert!(
        o.status.success(),
        "reference refused ours: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // And the model runs with only the CA trusted.
    let o = securerun(&[
        "embed",
        p(&model),
        "--trust-ca",
        p(&pki.path("root.pem")),
        "--signature",
        p(&ours),
        "--state-dir",
        p(pki.dir.path()),
        "--text",
        "hello",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Trusting keys only is not enough for a certificate signature.
    let o = securerun(&[
        "verify",
        p(&model),
        "--trust-key",
        p(&write_stranger_key(&pki)),
        "--signature",
        p(&ours),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("certificate mode") && err.contains("--trust-ca"),
        "{err}"
    );
}

fn write_stranger_key(pki: &Pki) -> PathBuf {
    let path = pki.path("stranger.pub");
    std::fs::write(
        &path,
        PrivateKey::generate_p256().public_key().to_pem().unwrap(),
    )
    .unwrap();
    path
}

fn certificate_error(r: Result<signing::Verified, SigningError>) -> String {
    match r {
        Err(SigningError::Certificate(reason)) => reason,
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

#[test]
fn each_bad_certificate_is_refused_with_its_own_reason() {
    let pki = Pki::new();
    let model = tiny_model(pki.dir.path());
    let sig = pki.path("m.sig");
    let verify = |trust: &TrustPolicy| signing::verify(&model, &sig, trust, &());

    let (key, cert) = pki.leaf("good", leaf_params("good"));
    sign_with_certificate(&model, &sig, &key, &cert, &pki);
    let v = verify(&pki.trust_root()).unwrap();
    assert_eq!(v.signer.mode(), "certificate");

    // A chain to a CA that is not trusted.
    let other = Pki::named("Other");
    let reason = certificate_error(verify(&other.trust_root()));
    assert!(reason.contains("does not lead to a trusted CA"), "{reason}");
    // A CA with the same name but another key (an impostor root).
    let impostor = Pki::new();
    let reason = certificate_error(verify(&impostor.trust_root()));
    assert!(
        reason.contains("signature in the chain does not verify"),
        "{reason}"
    );

    // Expired, and not yet valid.
    let mut params = leaf_params("expired");
    (params.not_before, params.not_after) = (date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1));
    let (key, cert) = pki.leaf("expired", params);
    sign_with_certificate(&model, &sig, &key, &cert, &pki);
    let reason = certificate_error(verify(&pki.trust_root()));
    assert!(reason.contains("has expired"), "{reason}");
    let mut params = leaf_params("future");
    (params.not_before, params.not_after) = (date_time_ymd(2100, 1, 1), date_time_ymd(2101, 1, 1));
    let (key, cert) = pki.leaf("future", params);
    sign_with_certificate(&model, &sig, &key, &cert, &pki);
    assert!(certificate_error(verify(&pki.trust_root())).contains("not valid yet"));

    // Not for code signing: an EKU list without it; a key usage without digitalSignature.
    let mut params = leaf_params("tls");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (key, cert) = pki.leaf("tls", params);
    sign_with_certificate(&model, &sig, &key, &cert, &pki);
    assert!(certificate_error(verify(&pki.trust_root())).contains("not valid for code signing"));
    let mut params = leaf_params("no-ds");
    params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    let (key, cert) = pki.leaf("no-ds", params);
    sign_with_certificate(&model, &sig, &key, &cert, &pki);
    assert!(
        certificate_error(verify(&pki.trust_root())).contains("does not allow digital signatures")
    );

    // A CA certificate posing as the signer.
    let mut params = ca_params("sub CA");
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    let (key, cert) = pki.leaf("ca-leaf", params);
    sign_with_certificate(&model, &sig, &key, &cert, &pki);
    assert!(certificate_error(verify(&pki.trust_root())).contains("is a CA certificate"));

    // A valid certificate swapped into a bundle signed by another key.
    let (key, cert) = pki.leaf("good", leaf_params("good"));
    sign_with_certificate(&model, &sig, &key, &cert, &pki);
    let (_, other_cert) = pki.leaf("other", leaf_params("other"));
    let mut bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sig).unwrap()).unwrap();
    let der = signing::certificate::read_pem_certificates(&other_cert)
        .unwrap()
        .remove(0);
    bundle["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"] =
        signing::bundle::b64_encode(&der).into();
    std::fs::write(&sig, bundle.to_string()).unwrap();
    assert!(matches!(
        verify(&pki.trust_root()),
        Err(SigningError::BadCertificateSignature)
    ));

    // Nothing trusted for certificates.
    assert!(matches!(
        verify(&TrustPolicy::keys(vec![
            PrivateKey::generate_p256().public_key()
        ])),
        Err(SigningError::NoTrustFor("certificate", _))
    ));

    // Signing with a certificate that is not for the key is refused up front.
    let (_, cert) = pki.leaf("mismatch", leaf_params("mismatch"));
    let o = securerun(&[
        "sign",
        p(&model),
        "--key",
        p(&key),
        "--certificate",
        p(&cert),
        "--signature",
        p(&sig),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not for this private key"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Keyless: a real model-signing bundle from Sigstore's public-good instance (Fulcio certificate,
// Rekor entry, RFC 3161 timestamp), copied from the model-transparency project's test data.

const IDENTITY: &str = "stefanb@us.ibm.com";
const ISSUER: &str = "https://sigstore.verify.ibm.com/oauth2";

fn keyless_fixture() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("v1.1.0-sigstore");
    common::copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keyless-v1.1.0"),
        &model,
    );
    (tmp, model)
}

fn verify_keyless(
    model: &Path,
    identity: &str,
    issuer: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "verify",
        p(model),
        "--identity",
        identity,
        "--issuer",
        issuer,
    ];
    args.extend_from_slice(extra);
    securerun(&args)
}

#[test]
fn keyless_bundle_verifies_offline_against_identity_policy() {
    let (_tmp, model) = keyless_fixture();
    let o = verify_keyless(&model, IDENTITY, ISSUER, &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("mode keyless") && out.contains(IDENTITY) && out.contains("2 files"),
        "{out}"
    );

    let fails_with = |o: std::process::Output, needle: &str| {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "unexpected success");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    };
    fails_with(
        verify_keyless(&model, "mallory@example.com", ISSUER, &[]),
        "identity mismatch",
    );
    fails_with(
        verify_keyless(&model, IDENTITY, "https://accounts.google.com", &[]),
        "issuer mismatch",
    );
    // Not a keyless trust at all: only a key is trusted.
    let key = model.parent().unwrap().join("k.pub");
    std::fs::write(
        &key,
        PrivateKey::generate_p256().public_key().to_pem().unwrap(),
    )
    .unwrap();
    fails_with(
        securerun(&["verify", p(&model), "--trust-key", p(&key)]),
        "keyless mode",
    );

    // A trust root without the Fulcio CAs that issued the certificate.
    let mut root: serde_json::Value =
        serde_json::from_str(sigstore_verify::trust_root::SIGSTORE_PRODUCTION_TRUSTED_ROOT)
            .unwrap();
    root["certificateAuthorities"] = serde_json::json!([]);
    let root_path = model.parent().unwrap().join("trusted_root.json");
    std::fs::write(&root_path, root.to_string()).unwrap();
    fails_with(
        verify_keyless(&model, IDENTITY, ISSUER, &["--trusted-root", p(&root_path)]),
        "keyless:",
    );
    std::fs::write(&root_path, "{\"not\": \"a root\"").unwrap();
    fails_with(
        verify_keyless(&model, IDENTITY, ISSUER, &["--trusted-root", p(&root_path)]),
        "invalid trusted root",
    );

    // A changed file, and an added one.
    std::fs::write(model.join("signme-1"), "signme-X").unwrap();
    fails_with(
        verify_keyless(&model, IDENTITY, ISSUER, &[]),
        "\"signme-1\" does not match its signed digest",
    );
    let (_tmp, model) = keyless_fixture();
    std::fs::write(model.join("extra"), "x").unwrap();
    fails_with(
        verify_keyless(&model, IDENTITY, ISSUER, &[]),
        "\"extra\" is in the model but not covered",
    );

    // An edited statement (consistent subject digest, so only the signature can catch it).
    let (_tmp, model) = keyless_fixture();
    let sig = model.join("model.sig");
    let mut bundle: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sig).unwrap()).unwrap();
    let payload =
        signing::bundle::b64_decode(bundle["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap();
    let mut st: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    st["predicate"]["resources"][0]["digest"] = hex::encode([0u8; 32]).into();
    let resources: Vec<signing::bundle::Resource> =
        serde_json::from_value(st["predicate"]["resources"].clone()).unwrap();
    st["subject"][0]["digest"]["sha256"] =
        signing::bundle::subject_digest(&resources).unwrap().into();
    bundle["dsseEnvelope"]["payload"] =
        signing::bundle::b64_encode(st.to_string().as_bytes()).into();
    std::fs::write(&sig, bundle.to_string()).unwrap();
    fails_with(
        verify_keyless(&model, IDENTITY, ISSUER, &[]),
        "DSSE signature verification failed",
    );
}

// ---------------------------------------------------------------------------------------------
// Shards: files hashed in fixed-size pieces (`serialization.method = shards`).

/// Runs Python code with the reference implementation's interpreter.
fn reference_python(code: &str) -> std::process::Output {
    let python = reference_cli().parent().unwrap().join("python");
    Command::new(python).args(["-c", code]).output().unwrap()
}

#[test]
fn shards_interoperate_with_the_reference_library_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::minilm();
    let (key, public) = (tmp.path().join("k.key"), tmp.path().join("k.pub"));
    let private = PrivateKey::generate_p256();
    std::fs::write(&key, private.to_pem().unwrap()).unwrap();
    std::fs::write(&public, private.public_key().to_pem().unwrap()).unwrap();
    const SHARD: &str = "16777216"; // the 90 MB weights become 6 shards

    // securerun signs with shards; the reference library verifies with the same shard size.
    let ours = tmp.path().join("ours.sig");
    let o = securerun(&[
        "sign",
        p(&model),
        "--key",
        p(&key),
        "--shards",
        SHARD,
        "--signature",
        p(&ours),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = reference_python(&format!(
        "import model_signing\nfrom model_signing import hashing\n\
         h = hashing.Config().use_shard_serialization(shard_size={SHARD})\n\
         model_signing.verifying.Config().use_elliptic_key_verifier(public_key={:?})\
         .set_hashing_config(h).verify({:?}, {:?})",
        p(&public),
        p(&model),
        p(&ours)
    ));
    assert!(
        o.status.success(),
        "reference refused ours: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The reference signs with shards; securerun verifies, and runs the model.
    let theirs = tmp.path().join("theirs.sig");
    let o = reference_python(&format!(
        "import model_signing\nfrom model_signing import hashing\n\
         h = hashing.Config().use_shard_serialization(shard_size={SHARD})\n\
         model_signing.signing.Config().use_elliptic_key_signer(private_key={:?})\
         .set_hashing_config(h).sign({:?}, {:?})",
        p(&key),
        p(&model),
        p(&theirs)
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = securerun(&[
        "verify",
        p(&model),
        "--trust-key",
        p(&public),
        "--signature",
        p(&theirs),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("shards of 16777216 bytes"), "{out}");
    let o = securerun(&[
        "embed",
        p(&model),
        "--trust-key",
        p(&public),
        "--signature",
        p(&theirs),
        "--state-dir",
        p(tmp.path()),
        "--text",
        "hello",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A flipped byte in the fourth shard of a copy names the file.
    let copy = tmp.path().join("copy");
    common::copy_dir(&model, &copy);
    let weights = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[3 * 16_777_216 + 5] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let r = signing::verify(
        &copy,
        &theirs,
        &TrustPolicy::keys(vec![private.public_key()]),
        &(),
    );
    assert!(
        matches!(r, Err(SigningError::DigestMismatch(ref n)) if n == "model.safetensors"),
        "{r:?}"
    );
}
