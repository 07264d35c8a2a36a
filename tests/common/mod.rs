//! Shared helpers for the integration tests: where the real models are, the reference outputs.

#![allow(dead_code)]

use std::path::PathBuf;

/// The directory `scripts/fetch-models.sh` fills (or `$SECURERUN_MODELS_DIR`).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("SECURERUN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"));
    assert!(
        dir.join("smollm2-135m-instruct/model.safetensors")
            .is_file()
            && dir.join("all-minilm-l6-v2/model.safetensors").is_file(),
        "real models missing in {}: run scripts/fetch-models.sh first",
        dir.display()
    );
    dir
}

pub fn smollm2() -> PathBuf {
    models_dir().join("smollm2-135m-instruct")
}

pub fn minilm() -> PathBuf {
    models_dir().join("all-minilm-l6-v2")
}

pub fn reference(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

pub fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Options for tests about numerics, not trust: no signature required.
pub fn unsigned() -> securerun::OpenOptions {
    securerun::OpenOptions {
        allow_unsigned: true,
        ..Default::default()
    }
}

/// Copies a model directory (recursively) so a test can sign or tamper with its own copy.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Runs the `securerun` binary built for this test run.
pub fn securerun(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_securerun"))
        .args(args)
        .output()
        .expect("run securerun")
}

/// [`securerun`] with extra environment variables.
pub fn securerun_env(args: &[&str], env: &[(&str, std::path::PathBuf)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_securerun"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run securerun")
}

pub fn p(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// The reference OpenSSF `model_signing` CLI, installed by `scripts/test.sh` (or
/// `$SECURERUN_MODEL_SIGNING`).
pub fn reference_cli() -> PathBuf {
    let path = std::env::var_os("SECURERUN_MODEL_SIGNING")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/signing-env/bin/model_signing")
        });
    assert!(
        path.is_file(),
        "reference CLI missing at {}: run scripts/test.sh",
        path.display()
    );
    path
}
