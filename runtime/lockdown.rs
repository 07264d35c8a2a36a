//! Lockdown: while `<state>/lockdown` exists, a running server refuses every request that does
//! not carry the `admin` scope. Switched by `securerun lockdown on|off` or the admin API; a
//! server notices within a quarter of a second and audits the change.

use std::path::{Path, PathBuf};

pub fn flag_path(state: &Path) -> PathBuf {
    state.join("lockdown")
}

pub fn is_on(state: &Path) -> bool {
    std::fs::symlink_metadata(flag_path(state)).is_ok()
}

/// The flag's text (since when, and the reason given), if lockdown is on.
pub fn describe(state: &Path) -> Option<String> {
    let bytes = securerun_models::fsutil::read_bounded(&flag_path(state), 4096).ok()?;
    Some(String::from_utf8_lossy(&bytes).trim().to_string())
}

pub fn set(state: &Path, on: bool, reason: &str) -> std::io::Result<()> {
    let path = flag_path(state);
    if on {
        crate::trust::create_private_dir(state)?;
        let text = format!(
            "on since unix {}: {}\n",
            crate::tokens::now(),
            reason.replace('\n', " ")
        );
        crate::audit::keys::write_secret(&path, text.as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}
