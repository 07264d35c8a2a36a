//! The state directory is checked like a key file before anything in it is trusted: it holds
//! the token store, the trust store (which keys may sign models), the lockdown flag, the audit
//! log and their locks. Someone else who can write to it, or to a directory above it, can
//! replace any of those, so such a directory is refused with the command that fixes it.
//!
//! Rules, for the directory and every directory above it (after resolving symlinks):
//! owned by the invoking user or root, and not writable by group or others — except that a
//! sticky directory like `/tmp` may be (nobody else can rename or delete our entries in it).
//! The state directory itself must not be a symlink, and is created 0700 if missing. Files
//! inside are opened without following symlinks (`O_NOFOLLOW`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a state directory is refused.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("no state directory: set SECURERUN_STATE_DIR or pass --state-dir")]
    None,
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {0} is a symbolic link: point --state-dir at the real directory")]
    Symlink(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} is owned by uid {owner}, not by you (uid {me}) or root: anyone who owns it can replace the tokens, trust keys and audit log; run: chown {me} {path}")]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is writable by group or others (mode {mode:o}): they could replace the tokens, trust keys and audit log; run: chmod go-w {path}")]
    Writable { path: PathBuf, mode: u32 },
}

/// Resolves the state directory (`explicit`, else the default) and checks it.
pub fn resolve(explicit: Option<PathBuf>) -> Result<PathBuf, StateDirError> {
    let dir = explicit
        .or_else(crate::trust::default_state_dir)
        .ok_or(StateDirError::None)?;
    check(&dir)?;
    Ok(dir)
}

/// Checks `dir` (which may not exist yet: then the nearest existing ancestor is checked).
pub fn check(dir: &Path) -> Result<(), StateDirError> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => return Err(StateDirError::Symlink(dir.into())),
        Ok(m) if !m.is_dir() => return Err(StateDirError::NotADirectory(dir.into())),
        Ok(m) => check_one(dir, &m, me, false)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StateDirError::Io {
                path: dir.into(),
                source,
            })
        }
    }
    // Every existing directory above it, as the kernel resolves it.
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            return Ok(());
        }
    }
    let absolute = existing
        .canonicalize()
        .map_err(|source| StateDirError::Io {
            path: existing.clone(),
            source,
        })?;
    for ancestor in absolute.ancestors() {
        let m = std::fs::metadata(ancestor).map_err(|source| StateDirError::Io {
            path: ancestor.into(),
            source,
        })?;
        check_one(ancestor, &m, me, true)?;
    }
    Ok(())
}

fn check_one(
    path: &Path,
    m: &std::fs::Metadata,
    me: u32,
    sticky_ok: bool,
) -> Result<(), StateDirError> {
    if m.uid() != me && m.uid() != 0 {
        return Err(StateDirError::Owner {
            path: path.into(),
            owner: m.uid(),
            me,
        });
    }
    let mode = m.permissions().mode();
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Err(StateDirError::Writable {
            path: path.into(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Writes a file holding public material (`audit.pub`, trusted keys) with exactly mode 0644,
/// whatever the umask, never following a symlink at `path`.
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(path)?;
    // The umask may have narrowed the mode on creation; set it exactly (fchmod, on the handle).
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_state_directories_are_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        // Missing: fine (created 0700 later).
        check(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        check(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check(&dir).unwrap_err().to_string();
        assert!(e.contains("chmod go-w"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A writable directory above it.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check(&dir).unwrap_err().to_string();
        assert!(e.contains(&tmp.path().display().to_string()), "{e}");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // A symlink as the state directory.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(check(&link), Err(StateDirError::Symlink(_))));
        // Owned by someone else (only root can arrange that here).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let e = check(&dir).unwrap_err().to_string();
            assert!(e.contains("chown 0"), "{e}");
        }
    }
}
