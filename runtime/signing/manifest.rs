//! The manifest of a model: the SHA-256 of every file, hashed in parallel across cores.

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::bundle::Resource;
use super::SigningError;

/// How a model is cut into signed resources (the bundle's `serialization.method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One resource per file.
    Files,
    /// Each file cut into `size`-byte shards (the last one shorter), named `path:start:end`;
    /// empty files have no shard, as in the reference implementation.
    Shards { size: u64 },
}

impl Method {
    /// The resource `algorithm` string the reference signer writes for this method.
    pub fn algorithm(self) -> String {
        match self {
            Method::Files => "sha256".into(),
            Method::Shards { size } => format!("sha256-sharded-{size}"),
        }
    }
}

/// Reports hashing progress (bytes); the CLI draws a progress bar with it.
pub trait Progress: Sync {
    fn start(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// No progress reporting.
impl Progress for () {}

/// Every resource of a model and its digest, in canonical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub resources: Vec<Resource>,
    /// Number of files covered (a sharded file counts once; an empty file has no shard).
    pub files: usize,
    pub bytes: u64,
}

/// Hashes a model: a single file is named `"."`; a directory contributes every regular file
/// below it (relative POSIX names) except `ignore` paths and the signature file itself.
/// Symlinks are refused, as the reference signer does with `allow_symlinks: false`.
pub fn compute(
    model: &Path,
    method: Method,
    ignore: &[String],
    signature: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, SigningError> {
    compute_with(model, method, ignore, signature, &|_| None, progress)
}

/// Like [`compute`], but takes a file's bytes from `loaded` when it has them: the read-only
/// mapping or buffer the loader itself uses, so what is verified is what runs.
pub fn compute_with<'a>(
    model: &Path,
    method: Method,
    ignore: &[String],
    signature: &Path,
    loaded: &(dyn Fn(&Path) -> Option<&'a [u8]> + Sync),
    progress: &dyn Progress,
) -> Result<Manifest, SigningError> {
    let files = list_files(model, ignore, signature)?;
    let pieces = cut(&files, method);
    let bytes = files.iter().map(|f| f.len).sum();
    progress.start(bytes);
    let digests = hash_parallel(&pieces, loaded, progress);
    progress.finish();
    let resources = pieces
        .iter()
        .zip(digests?)
        .map(|(piece, digest)| Resource {
            name: piece.name.clone(),
            algorithm: method.algorithm(),
            digest,
        })
        .collect();
    let mut covered: Vec<&str> = pieces.iter().map(|p| p.file.name.as_str()).collect();
    covered.dedup();
    Ok(Manifest {
        resources,
        files: covered.len(),
        bytes,
    })
}

/// The resource names `method` makes of `model`, without hashing anything: lets a verifier
/// report a renamed, added or removed file before reading gigabytes.
pub fn names(
    model: &Path,
    method: Method,
    ignore: &[String],
    signature: &Path,
) -> Result<Vec<String>, SigningError> {
    let files = list_files(model, ignore, signature)?;
    Ok(cut(&files, method).into_iter().map(|p| p.name).collect())
}

struct ModelFile {
    name: String,
    path: PathBuf,
    len: u64,
}

/// A resource to hash: a whole file or a byte range of one.
struct Piece<'f> {
    name: String,
    file: &'f ModelFile,
    start: u64,
    end: u64,
}

fn list_files(
    model: &Path,
    ignore: &[String],
    signature: &Path,
) -> Result<Vec<ModelFile>, SigningError> {
    let meta = std::fs::symlink_metadata(model).map_err(|e| SigningError::io(model, e))?;
    if meta.file_type().is_symlink() {
        return Err(SigningError::Symlink(model.to_path_buf()));
    }
    let mut files = Vec::new();
    if meta.is_file() {
        files.push((".".to_string(), model.to_path_buf()));
    } else {
        let signature = std::fs::canonicalize(signature).ok();
        walk(model, model, ignore, signature.as_deref(), &mut files)?;
    }
    // The reference orders resources by path components (Python `PurePosixPath` ordering),
    // which differs from plain string order when a name sorts around '/'.
    files.sort_by(|a, b| a.0.split('/').cmp(b.0.split('/')));
    files
        .into_iter()
        .map(|(name, path)| {
            let len = std::fs::symlink_metadata(&path)
                .map_err(|e| SigningError::io(&path, e))?
                .len();
            Ok(ModelFile { name, path, len })
        })
        .collect()
}

fn cut(files: &[ModelFile], method: Method) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    for file in files {
        match method {
            Method::Files => pieces.push(Piece {
                name: file.name.clone(),
                file,
                start: 0,
                end: file.len,
            }),
            Method::Shards { size } => {
                let mut start = 0;
                while start < file.len {
                    let end = start.saturating_add(size).min(file.len);
                    pieces.push(Piece {
                        name: format!("{}:{start}:{end}", file.name),
                        file,
                        start,
                        end,
                    });
                    start = end;
                }
            }
        }
    }
    pieces
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

/// Bytes hashed between progress reports.
const PROGRESS_STEP: usize = 64 * 1024 * 1024;

/// SHA-256 (hex) of each piece, using all cores: pieces are handed to workers largest first so
/// one big file does not end up last.
fn hash_parallel<'a>(
    pieces: &[Piece<'_>],
    loaded: &(dyn Fn(&Path) -> Option<&'a [u8]> + Sync),
    progress: &dyn Progress,
) -> Result<Vec<String>, SigningError> {
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pieces[i].end - pieces[i].start));
    let results: Mutex<Vec<Option<Result<String, SigningError>>>> =
        Mutex::new((0..pieces.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(pieces.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let r = hash_piece(&pieces[i], loaded, progress);
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

fn hash_piece<'a>(
    piece: &Piece<'_>,
    loaded: &(dyn Fn(&Path) -> Option<&'a [u8]> + Sync),
    progress: &dyn Progress,
) -> Result<String, SigningError> {
    let path = &piece.file.path;
    let range = |bytes: &[u8]| -> Result<String, SigningError> {
        // A file that changed length since it was listed is reported as modified.
        let slice = usize::try_from(piece.start)
            .ok()
            .zip(usize::try_from(piece.end).ok())
            .and_then(|(s, e)| bytes.get(s..e))
            .ok_or_else(|| SigningError::DigestMismatch(piece.file.name.clone()))?;
        let mut h = Sha256::new();
        for chunk in slice.chunks(PROGRESS_STEP) {
            h.update(chunk);
            progress.advance(chunk.len() as u64);
        }
        Ok(hex::encode(h.finalize()))
    };
    if let Some(bytes) = loaded(path) {
        if bytes.len() as u64 != piece.file.len {
            return Err(SigningError::DigestMismatch(piece.file.name.clone()));
        }
        return range(bytes);
    }
    let file = File::open(path).map_err(|e| SigningError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| SigningError::io(path, e))?
        .len();
    if len != piece.file.len {
        return Err(SigningError::DigestMismatch(piece.file.name.clone()));
    }
    if len == 0 {
        return range(&[]);
    }
    // SAFETY: read-only shared mapping of a file we only read; a concurrent writer could change
    // bytes under us, which at worst yields a digest that fails verification (documented).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| SigningError::io(path, e))?;
    range(&map)
}
