//! `pack`: one self-contained `.safetensors` file from a model directory.
//!
//! The auxiliary files the loader reads (config, tokenizer, chat template, generation and
//! sentence-transformers configs) go into `__metadata__` under `securerun.file.<name>`, so a
//! signature over the single file covers everything the loader uses.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::source::{ModelSource, Origin, EMBEDDED_PREFIX};
use crate::strict_safetensors::{Dtype, HeaderError, Limits, SafetensorsFile};

/// Marks a file written by `pack`, with the format version of the embedding.
pub const PACK_VERSION_KEY: &str = "securerun.pack";

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{0}: already exists (pass --force to replace it)")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialize: {0}")]
    Serialize(String),
    #[error("the packed header would be {len} bytes, over the {max}-byte header limit that loaders apply by default; raise --max-header-bytes when packing and loading")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("the packed file failed validation: {0}")]
    Verify(String),
}

/// What was written.
#[derive(Debug)]
pub struct PackSummary {
    pub path: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
    pub embedded: Vec<String>,
}

struct TensorView<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn st_dtype(d: Dtype) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        Dtype::Bool => S::BOOL,
        Dtype::U8 => S::U8,
        Dtype::I8 => S::I8,
        Dtype::F8E4M3 => S::F8_E4M3,
        Dtype::F8E5M2 => S::F8_E5M2,
        Dtype::I16 => S::I16,
        Dtype::U16 => S::U16,
        Dtype::F16 => S::F16,
        Dtype::BF16 => S::BF16,
        Dtype::I32 => S::I32,
        Dtype::U32 => S::U32,
        Dtype::F32 => S::F32,
        Dtype::F64 => S::F64,
        Dtype::I64 => S::I64,
        Dtype::U64 => S::U64,
    }
}

/// Writes `source` as one file at `out`, atomically (temporary file, fsync, rename), then
/// re-opens the result with the strict loader under `limits`.
pub fn pack(
    source: &ModelSource,
    out: &Path,
    force: bool,
    limits: &Limits,
) -> Result<PackSummary, PackError> {
    if !force && fs::symlink_metadata(out).is_ok() {
        return Err(PackError::Exists(out.to_path_buf()));
    }
    let mut metadata: HashMap<String, String> = HashMap::new();
    // Keep the source's own metadata (e.g. "format": "pt"), but never stale embedded files.
    for f in source.weight_files() {
        for (k, v) in &f.header().metadata {
            if !k.starts_with(EMBEDDED_PREFIX) && k != PACK_VERSION_KEY {
                metadata.insert(k.clone(), v.clone());
            }
        }
    }
    let mut embedded = Vec::new();
    for (name, aux) in source.aux_files() {
        let text = std::str::from_utf8(&aux.bytes).map_err(|_| {
            PackError::Serialize(format!(
                "{name} ({}) is not UTF-8 text",
                match &aux.origin {
                    Origin::Embedded => "embedded".to_string(),
                    Origin::File(p) => p.display().to_string(),
                }
            ))
        })?;
        metadata.insert(format!("{EMBEDDED_PREFIX}{name}"), text.to_string());
        embedded.push(name.clone());
    }
    metadata.insert(PACK_VERSION_KEY.into(), "1".into());

    let views: Vec<(String, TensorView)> = source
        .tensors()
        .map(|(f, t)| {
            (
                t.name.clone(),
                TensorView {
                    dtype: st_dtype(t.dtype),
                    shape: &t.shape,
                    data: f.tensor_bytes(t),
                },
            )
        })
        .collect();
    let tensors = views.len();

    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.safetensors".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    };
    let result = (|| {
        // The crate writes through its own sibling temp file and renames onto `tmp`; our rename
        // of `tmp` onto `out` happens only after the strict loader accepted the result.
        safetensors::serialize_to_file(views, Some(metadata), &tmp)
            .map_err(|e| PackError::Serialize(e.to_string()))?;
        let file = fs::File::open(&tmp).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(io(&tmp))?;
        let packed = SafetensorsFile::open(&tmp, limits).map_err(|e| match e.header_error() {
            Some(HeaderError::HeaderTooLarge { len, max }) => PackError::HeaderTooLarge {
                len: *len,
                max: *max,
            },
            _ => PackError::Verify(e.to_string()),
        })?;
        let bytes = packed.bytes().len() as u64;
        drop(packed);
        fs::rename(&tmp, out).map_err(io(out))?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(bytes)
    })();
    match result {
        Ok(bytes) => Ok(PackSummary {
            path: out.to_path_buf(),
            tensors,
            bytes,
            embedded,
        }),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}
