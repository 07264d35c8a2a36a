//! Model resolution: a Hugging Face-layout directory (single or sharded safetensors) or one
//! `.safetensors` file that carries its configuration in `__metadata__` (see [`crate::pack`]).
//!
//! A [`ModelSource`] holds every byte the loader will use: the mapped weight files and the small
//! auxiliary files (config, tokenizer, chat template...). Nothing is read from disk later, so the
//! set of inputs is fixed and can be verified as a whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::fsutil::{self, OpenError};
use crate::strict_safetensors::{Limits, SafetensorsError, SafetensorsFile, TensorInfo, UniqueMap};

/// The single-file weights name in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The shard index name in a sharded model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Prefix of `__metadata__` keys that embed an auxiliary file in a packed single file.
pub const EMBEDDED_PREFIX: &str = "securerun.file.";
/// Largest auxiliary file (config, tokenizer...) we read.
pub const MAX_AUX_FILE: u64 = 64 * 1024 * 1024;
/// Largest shard index we read.
const MAX_INDEX_FILE: u64 = 64 * 1024 * 1024;

/// Auxiliary files the loader may read, besides the weights. `modules.json` names the pooling
/// config directory of a sentence-transformers model, which is read too.
pub const AUX_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "modules.json",
    "sentence_bert_config.json",
];

/// Where an auxiliary file's bytes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Embedded in the `__metadata__` of a packed single file.
    Embedded,
    /// Read from this file.
    File(PathBuf),
}

/// A small auxiliary file, read whole.
#[derive(Debug, Clone)]
pub struct AuxFile {
    pub bytes: Vec<u8>,
    pub origin: Origin,
}

/// How the model was laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A directory with `model.safetensors`.
    Directory,
    /// A directory with `model.safetensors.index.json` and shards.
    Sharded,
    /// One `.safetensors` file.
    SingleFile,
}

/// Why a model could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    NotFound {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: no {WEIGHTS_FILE} or {INDEX_FILE} in this directory")]
    NoWeights { dir: PathBuf },
    #[error(
        "{dir}: both {WEIGHTS_FILE} and {INDEX_FILE} exist; refusing to guess which is the model"
    )]
    AmbiguousWeights { dir: PathBuf },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("{path}: invalid shard index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("shard index names {name:?}: {reason}")]
    ShardName { name: String, reason: &'static str },
    #[error("shard index lists tensor {tensor:?} more than once")]
    DuplicateIndexEntry { tensor: String },
    #[error("tensor {tensor:?} is in shard {shard:?} but the index does not list it there")]
    TensorNotIndexed { tensor: String, shard: String },
    #[error("the index places tensor {tensor:?} in shard {shard:?}, which does not contain it")]
    IndexedTensorMissing { tensor: String, shard: String },
    #[error("{path}: {key}: {reason}")]
    Aux {
        path: String,
        key: String,
        reason: String,
    },
}

/// A resolved model: mapped, validated weights and the auxiliary files the loader uses.
#[derive(Debug)]
pub struct ModelSource {
    path: PathBuf,
    layout: Layout,
    weights: Vec<SafetensorsFile>,
    index: HashMap<String, (usize, usize)>,
    aux: BTreeMap<String, AuxFile>,
    /// The shard index file, kept so that it too is among the bytes a verifier sees.
    index_file: Option<(PathBuf, Vec<u8>)>,
}

/// A resolved model taken apart to cross a process boundary: everything but the weight files,
/// which travel as open descriptors (see [`ModelSource::parts`]).
#[derive(Debug, Clone)]
pub struct SourceParts {
    pub path: PathBuf,
    pub layout: Layout,
    /// Paths of the weight files, in the order of the descriptors.
    pub weight_paths: Vec<PathBuf>,
    pub index_file: Option<(PathBuf, Vec<u8>)>,
    pub aux: BTreeMap<String, AuxFile>,
}

impl ModelSource {
    /// Takes the source apart: its non-weight parts and new descriptors for the very weight
    /// files it mapped (not re-opened paths), for [`ModelSource::from_parts`] in another process.
    pub fn parts(&self) -> std::io::Result<(SourceParts, Vec<std::fs::File>)> {
        let files = self
            .weights
            .iter()
            .map(|w| w.try_clone_file())
            .collect::<std::io::Result<Vec<_>>>()?;
        let parts = SourceParts {
            path: self.path.clone(),
            layout: self.layout,
            weight_paths: self
                .weights
                .iter()
                .map(|w| w.path().to_path_buf())
                .collect(),
            index_file: self.index_file.clone(),
            aux: self.aux.clone(),
        };
        Ok((parts, files))
    }

    /// Rebuilds a source from [`ModelSource::parts`], re-validating every header and the shard
    /// index from the bytes received: the receiving side trusts nothing it did not check.
    pub fn from_parts(
        parts: SourceParts,
        files: Vec<std::fs::File>,
        limits: &Limits,
    ) -> Result<Self, SourceError> {
        if files.len() != parts.weight_paths.len() || files.is_empty() {
            return Err(SourceError::NoWeights { dir: parts.path });
        }
        let weights = parts
            .weight_paths
            .iter()
            .zip(files)
            .map(|(path, file)| SafetensorsFile::from_file(path, file, limits))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some((index_path, bytes)) = &parts.index_file {
            let raw = parse_index(index_path, bytes)?;
            check_index_covers(&raw, &weights)?;
        }
        Ok(ModelSource {
            path: parts.path,
            layout: parts.layout,
            index: build_index(&weights),
            weights,
            aux: parts.aux,
            index_file: parts.index_file,
        })
    }

    /// Resolves `path` (a directory or a single `.safetensors` file) with the given header limits.
    pub fn open(path: &Path, limits: &Limits) -> Result<Self, SourceError> {
        let meta = std::fs::metadata(path).map_err(|source| SourceError::NotFound {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            Self::open_dir(path, limits)
        } else {
            Self::open_file(path, limits)
        }
    }

    fn open_dir(dir: &Path, limits: &Limits) -> Result<Self, SourceError> {
        let single = dir.join(WEIGHTS_FILE);
        let index_path = dir.join(INDEX_FILE);
        let (layout, weights, index_file) = match (
            fsutil::exists_no_follow(&single),
            fsutil::exists_no_follow(&index_path),
        ) {
            (true, true) => {
                return Err(SourceError::AmbiguousWeights {
                    dir: dir.to_path_buf(),
                })
            }
            (false, false) => {
                return Err(SourceError::NoWeights {
                    dir: dir.to_path_buf(),
                })
            }
            (true, false) => (
                Layout::Directory,
                vec![SafetensorsFile::open(&single, limits)?],
                None,
            ),
            (false, true) => {
                let bytes = fsutil::read_bounded(&index_path, MAX_INDEX_FILE)?;
                let raw = parse_index(&index_path, &bytes)?;
                let weights = open_shards(dir, &raw, limits)?;
                check_index_covers(&raw, &weights)?;
                (Layout::Sharded, weights, Some((index_path, bytes)))
            }
        };
        let mut source = ModelSource {
            path: dir.to_path_buf(),
            layout,
            index: build_index(&weights),
            weights,
            aux: BTreeMap::new(),
            index_file,
        };
        source.read_aux_beside(dir)?;
        Ok(source)
    }

    fn open_file(path: &Path, limits: &Limits) -> Result<Self, SourceError> {
        let file = SafetensorsFile::open(path, limits)?;
        let mut aux = BTreeMap::new();
        for (key, value) in &file.header().metadata {
            if let Some(name) = key.strip_prefix(EMBEDDED_PREFIX) {
                aux.insert(
                    name.to_string(),
                    AuxFile {
                        bytes: value.as_bytes().to_vec(),
                        origin: Origin::Embedded,
                    },
                );
            }
        }
        let weights = vec![file];
        let mut source = ModelSource {
            path: path.to_path_buf(),
            layout: Layout::SingleFile,
            index: build_index(&weights),
            weights,
            aux,
            index_file: None,
        };
        // Fall back to files beside the single file for whatever was not embedded; except for
        // a file made by `pack`, which is complete by construction: reading neighbours there
        // would let anyone who can write the directory (think /tmp) add configuration.
        let packed = source.weights[0]
            .header()
            .metadata
            .contains_key(crate::pack::PACK_VERSION_KEY);
        if packed {
            return Ok(source);
        }
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            source.read_aux_beside(dir)?;
        }
        Ok(source)
    }

    /// Reads the known auxiliary files from `dir`, keeping any already embedded.
    fn read_aux_beside(&mut self, dir: &Path) -> Result<(), SourceError> {
        for name in AUX_FILES {
            self.read_aux_file(dir, name)?;
        }
        if let Some(pooling) = self.pooling_config_name()? {
            self.read_aux_file(dir, &pooling)?;
        }
        Ok(())
    }

    fn read_aux_file(&mut self, dir: &Path, name: &str) -> Result<(), SourceError> {
        if self.aux.contains_key(name) {
            return Ok(());
        }
        let path = dir.join(name);
        if !fsutil::exists_no_follow(&path) {
            return Ok(());
        }
        let bytes = fsutil::read_bounded(&path, MAX_AUX_FILE)?;
        self.aux.insert(
            name.to_string(),
            AuxFile {
                bytes,
                origin: Origin::File(path),
            },
        );
        Ok(())
    }

    /// The relative path of the sentence-transformers pooling config named by `modules.json`.
    pub fn pooling_config_name(&self) -> Result<Option<String>, SourceError> {
        let Some(modules) = self.aux_json::<Vec<StModule>>("modules.json")? else {
            return Ok(None);
        };
        let Some(pooling) = modules
            .iter()
            .find(|m| m.kind == "sentence_transformers.models.Pooling")
        else {
            return Ok(None);
        };
        let dir = pooling.path.trim_end_matches('/');
        if !is_plain_relative(dir) {
            return Err(SourceError::Aux {
                path: "modules.json".into(),
                key: "path".into(),
                reason: format!("pooling module path {dir:?} must be a plain relative directory"),
            });
        }
        Ok(Some(format!("{dir}/config.json")))
    }

    /// The path this model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The mapped weight files (one, or the shards in name order).
    pub fn weight_files(&self) -> &[SafetensorsFile] {
        &self.weights
    }

    /// The shard index (path and bytes), for a sharded model.
    pub fn index_file(&self) -> Option<(&Path, &[u8])> {
        self.index_file
            .as_ref()
            .map(|(p, b)| (p.as_path(), b.as_slice()))
    }

    /// Every auxiliary file read, by relative name.
    pub fn aux_files(&self) -> &BTreeMap<String, AuxFile> {
        &self.aux
    }

    /// An auxiliary file's bytes.
    pub fn aux(&self, name: &str) -> Option<&[u8]> {
        self.aux.get(name).map(|a| a.bytes.as_slice())
    }

    /// Parses an auxiliary JSON file, if present.
    pub fn aux_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, SourceError> {
        let Some(bytes) = self.aux(name) else {
            return Ok(None);
        };
        serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|e| SourceError::Aux {
                path: name.to_string(),
                key: "json".into(),
                reason: e.to_string(),
            })
    }

    /// Looks a tensor up across all weight files.
    pub fn tensor(&self, name: &str) -> Option<(&SafetensorsFile, &TensorInfo)> {
        let &(file, idx) = self.index.get(name)?;
        let f = &self.weights[file];
        Some((f, &f.header().tensors[idx]))
    }

    /// A tensor and the index of the weight file that holds it.
    pub fn tensor_in_file(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        let &(file, idx) = self.index.get(name)?;
        Some((file, &self.weights[file].header().tensors[idx]))
    }

    /// All tensors, in file then data order.
    pub fn tensors(&self) -> impl Iterator<Item = (&SafetensorsFile, &TensorInfo)> {
        self.weights
            .iter()
            .flat_map(|f| f.header().tensors.iter().map(move |t| (f, t)))
    }

    /// Total bytes of tensor data.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors().map(|(_, t)| t.end - t.begin).sum()
    }
}

/// One entry of a sentence-transformers `modules.json`.
#[derive(serde::Deserialize)]
pub(crate) struct StModule {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: String,
}

/// A relative path of plain components only: no `..`, `.`, root, or empty component.
fn is_plain_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\0')
        && !p.contains('\\')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn build_index(weights: &[SafetensorsFile]) -> HashMap<String, (usize, usize)> {
    let mut index = HashMap::new();
    for (fi, f) in weights.iter().enumerate() {
        for (ti, t) in f.header().tensors.iter().enumerate() {
            index.insert(t.name.clone(), (fi, ti));
        }
    }
    index
}

#[derive(serde::Deserialize)]
struct RawIndex {
    #[serde(default)]
    #[allow(dead_code)] // informational only (total_size); parsed to require an object
    metadata: Option<serde_json::Value>,
    weight_map: UniqueMap<String>,
}

/// Validates the shard index and opens every shard it names, in name order.
fn open_shards(
    dir: &Path,
    raw: &RawIndex,
    limits: &Limits,
) -> Result<Vec<SafetensorsFile>, SourceError> {
    let mut shard_names: Vec<&str> = raw
        .weight_map
        .entries
        .iter()
        .map(|(_, s)| s.as_str())
        .collect();
    shard_names.sort_unstable();
    shard_names.dedup();
    let mut files = Vec::with_capacity(shard_names.len());
    for name in shard_names {
        check_shard_name(name)?;
        files.push(SafetensorsFile::open(&dir.join(name), limits)?);
    }
    Ok(files)
}

fn parse_index(index_path: &Path, bytes: &[u8]) -> Result<RawIndex, SourceError> {
    let raw: RawIndex = serde_json::from_slice(bytes).map_err(|e| SourceError::Index {
        path: index_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Some(tensor) = raw.weight_map.first_duplicate.clone() {
        return Err(SourceError::DuplicateIndexEntry { tensor });
    }
    if raw.weight_map.entries.is_empty() {
        return Err(SourceError::Index {
            path: index_path.to_path_buf(),
            reason: "weight_map is empty".into(),
        });
    }
    Ok(raw)
}

/// Shards must be plain file names inside the model directory.
fn check_shard_name(name: &str) -> Result<(), SourceError> {
    let bad = |reason| {
        Err(SourceError::ShardName {
            name: name.to_string(),
            reason,
        })
    };
    if name.starts_with('/') {
        return bad("absolute paths are not allowed");
    }
    if name.contains("..") {
        return bad("'..' is not allowed");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("shards must be files directly in the model directory");
    }
    if !is_plain_relative(name) {
        return bad("not a plain file name");
    }
    if !name.ends_with(".safetensors") {
        return bad("shard names must end in .safetensors");
    }
    Ok(())
}

/// Every indexed tensor is in its shard, and every shard tensor is indexed (exactly once, since
/// the index has no duplicate keys and a shard's header has no duplicate names).
fn check_index_covers(raw: &RawIndex, weights: &[SafetensorsFile]) -> Result<(), SourceError> {
    let shard_of = |f: &SafetensorsFile| {
        f.path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let expected: HashMap<&str, &str> = raw
        .weight_map
        .entries
        .iter()
        .map(|(t, s)| (t.as_str(), s.as_str()))
        .collect();
    for f in weights {
        let shard = shard_of(f);
        for t in &f.header().tensors {
            if expected.get(t.name.as_str()) != Some(&shard.as_str()) {
                return Err(SourceError::TensorNotIndexed {
                    tensor: t.name.clone(),
                    shard,
                });
            }
        }
    }
    let present: std::collections::HashSet<(String, &str)> = weights
        .iter()
        .flat_map(|f| {
            let shard = shard_of(f);
            f.header()
                .tensors
                .iter()
                .map(move |t| (shard.clone(), t.name.as_str()))
        })
        .collect();
    for (tensor, shard) in &raw.weight_map.entries {
        if !present.contains(&(shard.clone(), tensor.as_str())) {
            return Err(SourceError::IndexedTensorMissing {
                tensor: tensor.clone(),
                shard: shard.clone(),
            });
        }
    }
    Ok(())
}
