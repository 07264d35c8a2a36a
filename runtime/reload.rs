//! `securerun reload`: asks a running server, through its state directory, to replace models
//! by the versions on disk now, and waits for its answer. The request and the answer are small
//! files in the (private) state directory, written atomically; the server looks for a request
//! as often as it reloads tokens. The same replacement runs on SIGHUP and
//! `POST /admin/models/{name}/reload`; each is recorded in the audit log (`model_replaced`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Largest request or answer file read (a list of model names, a few outcomes).
const MAX_FILE: u64 = 64 * 1024;

pub fn request_path(state: &Path) -> PathBuf {
    state.join("reload-request.json")
}

pub fn answer_path(state: &Path) -> PathBuf {
    state.join("reload-answer.json")
}

/// What `securerun reload` asks for.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Matches the answer to this request.
    pub nonce: String,
    /// The models to replace; empty: every model.
    pub models: Vec<String>,
}

/// What happened to one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub model: String,
    pub replaced: bool,
    /// The new version, or why the running version stays.
    pub detail: String,
}

/// The server's answer to one request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub nonce: String,
    pub outcomes: Vec<Outcome>,
}

fn write(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    crate::audit::keys::write_secret(path, &bytes).map_err(|e| std::io::Error::other(e.to_string()))
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = securerun_models::fsutil::read_bounded(path, MAX_FILE).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Leaves a request for the server of `state`; returns its nonce.
pub fn ask(state: &Path, models: Vec<String>) -> std::io::Result<String> {
    let nonce = crate::server::openai::request_id("reload");
    let _ = std::fs::remove_file(answer_path(state));
    write(
        &request_path(state),
        &Request {
            nonce: nonce.clone(),
            models,
        },
    )?;
    Ok(nonce)
}

/// Takes the request waiting, if any (a malformed one is removed and ignored).
pub fn take(state: &Path) -> Option<Request> {
    let path = request_path(state);
    std::fs::symlink_metadata(&path).ok()?;
    let request = read(&path);
    let _ = std::fs::remove_file(&path);
    request
}

/// Writes the answer to a request.
pub fn answer(state: &Path, answer: &Answer) -> std::io::Result<()> {
    write(&answer_path(state), answer)
}

/// Waits up to `timeout` for the answer to request `nonce`.
pub fn wait(state: &Path, nonce: &str, timeout: Duration) -> Option<Answer> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Some(a) = read::<Answer>(&answer_path(state)) {
            if a.nonce == nonce {
                let _ = std::fs::remove_file(answer_path(state));
                return Some(a);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
