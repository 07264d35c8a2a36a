//! The manifest of a model: the SHA-256 of every file, hashed in parallel across cores.

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::bundle::Resource;
use super::SigningError;

/// Every file of a model and its digest, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub resources: Vec<Resource>,
    pub bytes: u64,
}

/// Hashes a model: a single file becomes one resource named `"."`; a directory, every regular
/// file below it (relative POSIX names) except `ignore` paths and the signature file itself.
/// Symlinks are refused, as the reference signer does with `allow_symlinks: false`.
pub fn compute(
    model: &Path,
    ignore: &[String],
    signature: &Path,
) -> Result<Manifest, SigningError> {
    compute_with(model, ignore, signature, &|_| None)
}

/// Like [`compute`], but takes a file's bytes from `loaded` when it has them: the read-only
/// mapping or buffer the loader itself uses, so what is verified is what runs.
pub fn compute_with<'a>(
    model: &Path,
    ignore: &[String],
    signature: &Path,
    loaded: &(dyn Fn(&Path) -> Option<&'a [u8]> + Sync),
) -> Result<Manifest, SigningError> {
    let meta = std::fs::symlink_metadata(model).map_err(|e| SigningError::io(model, e))?;
    if meta.file_type().is_symlink() {
        return Err(SigningError::Symlink(model.to_path_buf()));
    }
    let files: Vec<(String, PathBuf)> = if meta.is_file() {
        vec![(".".to_string(), model.to_path_buf())]
    } else {
        let signature = std::fs::canonicalize(signature).ok();
        let mut files = Vec::new();
        walk(model, model, ignore, signature.as_deref(), &mut files)?;
        files
    };
    let digests = hash_parallel(&files, loaded)?;
    let bytes = digests.iter().map(|(_, len)| len).sum();
    let mut resources: Vec<Resource> = files
        .into_iter()
        .zip(digests)
        .map(|((name, _), (digest, _))| Resource {
            name,
            algorithm: "sha256".into(),
            digest,
        })
        .collect();
    resources.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Manifest { resources, bytes })
}

fn is_ignored(rel: &str, ignore: &[String]) -> bool {
    ignore.iter().any(|i| {
        let i = i.trim_end_matches('/');
        rel == i || rel.starts_with(&format!("{i}/"))
    })
}

fn walk(
    root: &Path,
    dir: &Path,
    ignore: &[String],
    signature: Option<&Path>,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), SigningError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SigningError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| SigningError::io(dir, e))?;
        let path = entry.path();
        let rel = relative_name(root, &path)?;
        if is_ignored(&rel, ignore) {
            continue;
        }
        let ft = entry.file_type().map_err(|e| SigningError::io(&path, e))?;
        if ft.is_symlink() {
            return Err(SigningError::Symlink(path));
        }
        if ft.is_dir() {
            walk(root, &path, ignore, signature, out)?;
        } else if ft.is_file() {
            if signature.is_some_and(|s| std::fs::canonicalize(&path).ok().as_deref() == Some(s)) {
                continue;
            }
            out.push((rel, path));
        } else {
            return Err(SigningError::NotRegular(path));
        }
    }
    Ok(())
}

fn relative_name(root: &Path, path: &Path) -> Result<String, SigningError> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| SigningError::NotRegular(path.to_path_buf()))?;
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| SigningError::NonUtf8Name(path.to_path_buf()))?
                    .to_string(),
            ),
            _ => return Err(SigningError::NotRegular(path.to_path_buf())),
        }
    }
    Ok(parts.join("/"))
}

/// A file's hex digest and length.
type HashResult = Result<(String, u64), SigningError>;

/// SHA-256 of each file (hex) and its length, using all cores: files are handed to workers
/// largest first so one big shard does not end up last.
fn hash_parallel<'a>(
    files: &[(String, PathBuf)],
    loaded: &(dyn Fn(&Path) -> Option<&'a [u8]> + Sync),
) -> Result<Vec<(String, u64)>, SigningError> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_cached_key(|&i| {
        std::cmp::Reverse(std::fs::metadata(&files[i].1).map_or(0, |m| m.len()))
    });
    let results: Mutex<Vec<Option<HashResult>>> =
        Mutex::new((0..files.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let path = &files[i].1;
                let r = match loaded(path) {
                    Some(bytes) => Ok((hex::encode(Sha256::digest(bytes)), bytes.len() as u64)),
                    None => hash_file(path),
                };
                if let Ok(mut guard) = results.lock() {
                    guard[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(SigningError::Internal("hash worker failed".into()))))
        .collect()
}

/// Hashes one file through a read-only mapping (no copy into our memory).
pub fn hash_file(path: &Path) -> Result<(String, u64), SigningError> {
    let file = File::open(path).map_err(|e| SigningError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| SigningError::io(path, e))?
        .len();
    if len == 0 {
        return Ok((hex::encode(Sha256::digest(b"")), 0));
    }
    // SAFETY: read-only shared mapping of a file we only read; a concurrent writer could change
    // bytes under us, which at worst yields a digest that fails verification (documented).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| SigningError::io(path, e))?;
    Ok((hex::encode(Sha256::digest(&map[..])), len))
}
