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
/// Requests taken per look: a directory full of planted requests cannot keep the server busy.
const MAX_REQUESTS_PER_LOOK: usize = 8;
const REQUEST_PREFIX: &str = "reload-request-";
const ANSWER_PREFIX: &str = "reload-answer-";

/// Each request and its answer have their own files (named by the request's nonce), so
/// several `securerun reload` at once neither overwrite nor answer each other.
pub fn request_path(state: &Path, nonce: &str) -> PathBuf {
    state.join(format!("{REQUEST_PREFIX}{nonce}.json"))
}

pub fn answer_path(state: &Path, nonce: &str) -> PathBuf {
    state.join(format!("{ANSWER_PREFIX}{nonce}.json"))
}

/// A nonce as `ask` makes them: what may appear in a file name here.
fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce.len() <= 64
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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

/// Writes `value` to `path` whole or not at all (a temporary file, never through a link,
/// 0600, then renamed into place).
fn write(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = securerun_models::fsutil::read_bounded(path, MAX_FILE).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Leaves a request for the server of `state`; returns its nonce.
pub fn ask(state: &Path, models: Vec<String>) -> std::io::Result<String> {
    let nonce = crate::server::openai::request_id("reload");
    write(
        &request_path(state, &nonce),
        &Request {
            nonce: nonce.clone(),
            models,
        },
    )?;
    Ok(nonce)
}

/// Withdraws a request no server took.
pub fn withdraw(state: &Path, nonce: &str) {
    let _ = std::fs::remove_file(request_path(state, nonce));
}

/// Takes the requests waiting (a few per look). Each file is removed whatever it holds; a
/// malformed one, or one whose nonce does not match its name, is ignored.
pub fn take(state: &Path) -> Vec<Request> {
    let Ok(entries) = std::fs::read_dir(state) else {
        return Vec::new();
    };
    let mut requests = Vec::new();
    for entry in entries.flatten().take(4096) {
        if requests.len() >= MAX_REQUESTS_PER_LOOK {
            break;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(nonce) = name
            .strip_prefix(REQUEST_PREFIX)
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let path = entry.path();
        let request = read::<Request>(&path);
        let _ = std::fs::remove_file(&path);
        if let Some(r) = request.filter(|r| r.nonce == nonce && valid_nonce(nonce)) {
            requests.push(r);
        }
    }
    requests
}

/// Writes the answer to a request.
pub fn answer(state: &Path, answer: &Answer) -> std::io::Result<()> {
    if !valid_nonce(&answer.nonce) {
        return Err(std::io::Error::other("invalid nonce"));
    }
    write(&answer_path(state, &answer.nonce), answer)
}

/// Waits up to `timeout` for the answer to request `nonce`.
pub fn wait(state: &Path, nonce: &str, timeout: Duration) -> Option<Answer> {
    let until = Instant::now() + timeout;
    let path = answer_path(state, nonce);
    while Instant::now() < until {
        if let Some(a) = read::<Answer>(&path).filter(|a| a.nonce == nonce) {
            let _ = std::fs::remove_file(&path);
            return Some(a);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
