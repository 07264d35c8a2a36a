//! The state directory and the trust store: public keys whose model signatures are accepted.
//!
//! Layout: `<state>/trust/<key id>.pub`, where the key id is the SHA-256 of the key's PEM (the
//! bundle's `publicKey.hint`). The directory is created 0700.

use std::path::{Path, PathBuf};

use crate::signing::{PublicKey, SigningError};

/// `$SECURERUN_STATE_DIR`, else `$XDG_STATE_HOME/securerun`, else `~/.local/state/securerun`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SECURERUN_STATE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("securerun"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/securerun"))
}

/// Why the trust store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("no state directory: set SECURERUN_STATE_DIR or pass --state-dir")]
    NoStateDir,
    #[error(transparent)]
    StateDir(#[from] crate::state_dir::StateDirError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: SigningError },
    #[error("no trusted key with id {0}")]
    NotFound(String),
}

fn trust_dir(state: &Path) -> PathBuf {
    state.join("trust")
}

/// Every trusted key, with its file. A malformed file is an error, not skipped: a trust store
/// that silently drops entries is one nobody can reason about.
pub fn load(state: &Path) -> Result<Vec<(PathBuf, PublicKey)>, TrustError> {
    let dir = trust_dir(state);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(TrustError::Io { path: dir, source }),
    };
    let mut keys = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| TrustError::Io {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some("pub") {
            continue;
        }
        // Never through a symlink planted in the store.
        let pem = securerun_models::fsutil::read_bounded(&path, 64 * 1024).map_err(|e| {
            TrustError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let key = std::str::from_utf8(&pem)
            .map_err(|_| TrustError::Io {
                path: path.clone(),
                source: std::io::Error::other("not UTF-8"),
            })
            .and_then(|pem| {
                PublicKey::from_pem(pem).map_err(|source| TrustError::Key {
                    path: path.clone(),
                    source,
                })
            })?;
        keys.push((path.clone(), key));
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// Reads a public key PEM file.
pub fn read_key(path: &Path) -> Result<PublicKey, TrustError> {
    let pem = std::fs::read_to_string(path).map_err(|source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    PublicKey::from_pem(&pem).map_err(|source| TrustError::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// Adds a key to the store; returns its id.
/// Opens (creating, 0600) a lock file; the caller takes `lock()` or `try_lock()` on it.
pub fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        // O_NONBLOCK: a FIFO planted as the lock file fails to open instead of blocking.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
}

/// Creates `dir` (and missing parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

pub fn add(state: &Path, key_file: &Path) -> Result<String, TrustError> {
    let key = read_key(key_file)?;
    let key_err = |source| TrustError::Key {
        path: key_file.to_path_buf(),
        source,
    };
    let id = key.hint().map_err(key_err)?;
    let dir = trust_dir(state);
    create_private_dir(&dir).map_err(|source| TrustError::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(format!("{id}.pub"));
    let tmp = dir.join(format!(".{id}.tmp-{}", std::process::id()));
    let pem = key.to_pem().map_err(key_err)?;
    let _ = std::fs::remove_file(&tmp);
    crate::state_dir::write_public(&tmp, pem.as_bytes())
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|source| TrustError::Io { path, source })?;
    Ok(id)
}

/// Removes a key by id.
pub fn remove(state: &Path, id: &str) -> Result<(), TrustError> {
    let ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit());
    let path = trust_dir(state).join(format!("{id}.pub"));
    if !ok || !path.is_file() {
        return Err(TrustError::NotFound(id.to_string()));
    }
    std::fs::remove_file(&path).map_err(|source| TrustError::Io { path, source })
}
