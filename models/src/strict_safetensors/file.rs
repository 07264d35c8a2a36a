//! A validated safetensors file, mapped read-only.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};

use super::header::{self, Header, Limits, TensorInfo};
use super::HeaderError;
use crate::fsutil::{self, OpenError};

/// Why a safetensors file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{path}: cannot map file: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Header { path: PathBuf, source: HeaderError },
}

impl SafetensorsError {
    /// The header rejection, if that is what this is.
    pub fn header_error(&self) -> Option<&HeaderError> {
        match self {
            SafetensorsError::Header { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A safetensors file whose header has been validated, with its bytes mapped read-only.
///
/// The mapping is the single source of the file's bytes: hashing (for signature checks) and
/// tensor loading both read from it, never from the path again.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    /// Kept open so the very inode that was mapped (and verified) can be handed to a worker.
    file: File,
    map: Mmap,
    header: Header,
}

impl SafetensorsFile {
    /// Opens `path` (refusing symlinks and non-regular files), maps it and validates its header.
    pub fn open(path: &Path, limits: &Limits) -> Result<Self, SafetensorsError> {
        let file = fsutil::open_regular(path)?;
        Self::from_file(path, file, limits)
    }

    /// Maps an already opened file and validates its header.
    pub fn from_file(path: &Path, file: File, limits: &Limits) -> Result<Self, SafetensorsError> {
        let header_err = |source| SafetensorsError::Header {
            path: path.to_path_buf(),
            source,
        };
        let len = file
            .metadata()
            .map_err(|source| SafetensorsError::Map {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len < 8 {
            // mmap of an empty file fails with a confusing EINVAL; report the real problem.
            return Err(header_err(HeaderError::FileTooSmall { len }));
        }
        // SAFETY: the file is opened read-only and mapped private read-only; we never create a
        // mutable view. Another process truncating or rewriting the file while it is mapped is
        // the residual risk documented in docs/threat-model.md (model files must not be writable
        // by untrusted users); the signing layer hashes this same mapping before use.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| SafetensorsError::Map {
            path: path.to_path_buf(),
            source,
        })?;
        let header = header::parse(&map, limits).map_err(header_err)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            map,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new descriptor for the mapped file (same inode, read-only).
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The whole file, as mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Drops this process's resident pages of a tensor once it has been copied out, so loading
    /// does not hold the mapping and the copies in memory at once (peak RSS ~ one copy).
    /// Best effort: an error only means the pages stay resident.
    pub fn release_pages(&self, info: &TensorInfo) {
        self.release_range(info, 0, (info.end - info.begin) as usize);
    }

    /// Maps in a tensor's pages (`len` bytes from `offset`) with one call instead of one page
    /// fault per page (`MADV_POPULATE_READ`), before they are read. Best effort.
    pub fn populate_range(&self, info: &TensorInfo, offset: usize, len: usize) {
        let size = (info.end - info.begin) as usize;
        let offset = offset.min(size);
        let len = len.min(size - offset);
        if len > 0 {
            let start = (self.header.data_start() + info.begin) as usize + offset;
            let _ = self
                .map
                .advise_range(memmap2::Advice::PopulateRead, start, len);
        }
    }

    /// [`SafetensorsFile::release_pages`] for `len` bytes from `offset` into the tensor (a
    /// loader streaming a large tensor through in pieces). Ranges past the tensor are clipped.
    pub fn release_range(&self, info: &TensorInfo, offset: usize, len: usize) {
        let size = (info.end - info.begin) as usize;
        let offset = offset.min(size);
        let len = len.min(size - offset);
        let start = (self.header.data_start() + info.begin) as usize + offset;
        if len == 0 {
            return;
        }
        // SAFETY: the mapping is shared, read-only and file-backed, so MADV_DONTNEED discards
        // nothing: a later read faults the same bytes back in from the page cache. The range is
        // inside the mapping (validated header offsets); memmap2 aligns it to pages.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, len)
        };
    }

    /// The bytes of one tensor of this file. Offsets were validated against the mapping length
    /// when the header was parsed.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.header.data_start() + info.begin) as usize;
        let end = (self.header.data_start() + info.end) as usize;
        &self.map[start..end]
    }
}
