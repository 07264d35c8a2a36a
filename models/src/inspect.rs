//! A report of what a model file contains, without running it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::arch::Architecture;
use crate::source::{Layout, ModelSource, Origin, EMBEDDED_PREFIX};
use crate::strict_safetensors::Dtype;

/// What `securerun inspect` prints.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    pub path: String,
    pub layout: &'static str,
    /// `model_type` and whether securerun supports it, or why it is unknown.
    pub architecture: String,
    pub supported: bool,
    pub parameters: u64,
    pub weight_bytes: u64,
    pub files: Vec<FileReport>,
    pub dtypes: BTreeMap<String, DtypeReport>,
    pub aux_files: Vec<AuxReport>,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorReport>,
}

#[derive(Debug, Serialize)]
pub struct FileReport {
    pub path: String,
    pub bytes: u64,
    pub header_bytes: u64,
    pub tensors: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DtypeReport {
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct AuxReport {
    pub name: String,
    pub bytes: usize,
    pub origin: String,
}

#[derive(Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// Builds the report. Works on a bare `.safetensors` file with no config.
pub fn report(source: &ModelSource) -> ModelReport {
    let (architecture, supported) = match crate::load::config(source) {
        Err(e) => (format!("unknown ({e})"), false),
        Ok(cfg) => match Architecture::detect(&cfg) {
            Ok(arch) => (arch.name().to_string(), true),
            Err(e) => (format!("unsupported ({e})"), false),
        },
    };
    let mut dtypes: BTreeMap<String, DtypeReport> = BTreeMap::new();
    let mut tensors = Vec::new();
    let mut parameters = 0;
    for (_, t) in source.tensors() {
        let d = dtypes.entry(t.dtype.to_string()).or_default();
        d.tensors += 1;
        d.parameters += t.elements();
        d.bytes += t.end - t.begin;
        parameters += t.elements();
        tensors.push(TensorReport {
            name: t.name.clone(),
            dtype: t.dtype.as_str(),
            shape: t.shape.clone(),
            bytes: t.end - t.begin,
        });
    }
    tensors.sort_by_cached_key(|t| natural_key(&t.name));
    let files = source
        .weight_files()
        .iter()
        .map(|f| FileReport {
            path: f.path().display().to_string(),
            bytes: f.bytes().len() as u64,
            header_bytes: f.header().header_len,
            tensors: f.header().tensors.len(),
        })
        .collect();
    let aux_files = source
        .aux_files()
        .iter()
        .map(|(name, a)| AuxReport {
            name: name.clone(),
            bytes: a.bytes.len(),
            origin: match &a.origin {
                Origin::Embedded => "embedded".to_string(),
                Origin::File(p) => p.display().to_string(),
            },
        })
        .collect();
    // Embedded files are listed under aux_files; the rest of the metadata is shown as is.
    let metadata = source
        .weight_files()
        .iter()
        .flat_map(|f| f.header().metadata.iter())
        .filter(|(k, _)| !k.starts_with(EMBEDDED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ModelReport {
        path: source.path().display().to_string(),
        layout: match source.layout() {
            Layout::Directory => "directory",
            Layout::Sharded => "sharded directory",
            Layout::SingleFile => "single file",
        },
        architecture,
        supported,
        parameters,
        weight_bytes: source.weight_bytes(),
        files,
        dtypes,
        aux_files,
        metadata,
        tensors,
    }
}

/// Sorts `layers.10` after `layers.9`.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, p.to_string()),
        })
        .collect()
}

/// What the weights become at a run precision: the mix of types and the memory they take.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionReport {
    pub precision: String,
    /// What `auto` (or the precision itself) resolves to on this CPU.
    pub resolved: String,
    /// Per run type: tensors, parameters, bytes.
    pub types: BTreeMap<String, DtypeReport>,
    /// Bytes of weights at run precision (norms and biases in f32 included).
    pub bytes: u64,
    /// Of those, bytes read in place from the model file's mapping (no copy).
    pub in_place_bytes: u64,
}

/// The plan the owned decoder follows at `precision` (families it does not run compute at
/// f32, bf16 or f16 only).
pub fn precision_report(source: &ModelSource, precision: crate::Precision) -> PrecisionReport {
    use crate::precision::{in_place, matrix_bytes, Role};
    let tied = crate::load::config(source)
        .ok()
        .and_then(|c| c.get("tie_word_embeddings").and_then(|v| v.as_bool()))
        .unwrap_or(false);
    let mut types: BTreeMap<String, DtypeReport> = BTreeMap::new();
    let (mut bytes, mut in_place_bytes) = (0u64, 0u64);
    for (f, t) in source.tensors() {
        let params: u64 = t.shape.iter().map(|&d| d as u64).product();
        let (name, b, mapped) = match t.shape[..] {
            [rows, cols] => {
                let role = if t.name == "lm_head.weight"
                    || (tied && t.name.ends_with("embed_tokens.weight"))
                {
                    Role::Head
                } else if t.name.ends_with("embed_tokens.weight") {
                    Role::Embedding
                } else {
                    Role::Linear
                };
                let wt = precision.weight_type(role, cols);
                (
                    wt.name(),
                    matrix_bytes(wt, rows, cols),
                    in_place(t.dtype, wt, f.tensor_bytes(t)),
                )
            }
            _ => ("f32", params * 4, t.dtype == Dtype::F32),
        };
        let d = types.entry(name.to_string()).or_default();
        d.tensors += 1;
        d.parameters += params;
        d.bytes += b;
        bytes += b;
        if mapped {
            in_place_bytes += b;
        }
    }
    PrecisionReport {
        precision: precision.to_string(),
        resolved: precision.resolve().to_string(),
        types,
        bytes,
        in_place_bytes,
    }
}
