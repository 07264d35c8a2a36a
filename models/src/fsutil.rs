//! Opening model files: regular files only, never through a symlink, reads bounded in size.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a model file could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: is a symbolic link; only regular files are read here (pass the real path)")]
    Symlink { path: PathBuf },
    #[error("{path}: not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {len} bytes exceeds the {max}-byte limit for this kind of file")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("{path}: writable by group or others (mode {mode:04o}); a writer could change it after it is verified (chmod go-w)")]
    SharedWritable { path: PathBuf, mode: u32 },
    #[error("{path}: owned by uid {uid}, neither this user nor root; its owner could change it after it is verified")]
    ForeignOwner { path: PathBuf, uid: u32 },
}

/// Opens `path` read-only. Refuses a symlink as the last component (O_NOFOLLOW, so there is no
/// window between a check and the open), anything that is not a regular file, and a file that
/// someone other than this user (or root) could modify: model bytes are verified, then used,
/// and only their owner may be able to change them in between.
pub fn open_regular(path: &Path) -> Result<File, OpenError> {
    // O_NONBLOCK: opening a FIFO put where a file was expected must fail the regular-file
    // check below, not block waiting for a writer (it changes nothing for regular files).
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                OpenError::Symlink {
                    path: path.to_path_buf(),
                }
            } else {
                OpenError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    let meta = file.metadata().map_err(|source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(OpenError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    check_writers(path, &meta)?;
    Ok(file)
}

/// Checked on the open file (fstat), not the path, so the inode checked is the one read.
fn check_writers(path: &Path, meta: &std::fs::Metadata) -> Result<(), OpenError> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(OpenError::SharedWritable {
            path: path.to_path_buf(),
            mode,
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(OpenError::ForeignOwner {
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    Ok(())
}

/// Reads a whole small file (configs, tokenizers) with a size cap.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, OpenError> {
    let file = open_regular(path)?;
    let io = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(io)?.len();
    if len > max {
        return Err(OpenError::TooLarge {
            path: path.to_path_buf(),
            len,
            max,
        });
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows between the size check and the read.
    file.take(max + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > max {
        return Err(OpenError::TooLarge {
            path: path.to_path_buf(),
            len: buf.len() as u64,
            max,
        });
    }
    Ok(buf)
}

/// Whether a path exists without following a final symlink (a dangling or hostile link still
/// "exists", so that opening it later reports the symlink instead of silently skipping it).
pub fn exists_no_follow(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
