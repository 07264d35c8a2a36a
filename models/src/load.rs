//! Loading options and the steps shared by every model kind.

use std::sync::Arc;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::arch::{ArchError, Architecture};
use crate::source::{ModelSource, SourceError};
use crate::strict_safetensors::{Dtype, Limits};
use crate::tokenizer::{self, TokenizerError};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Header limits for every safetensors file.
    pub limits: Limits,
    /// Where to compute.
    pub device: Device,
    /// Compute dtype; `None` picks f32 on CPU (candle's CPU kernels are fastest and exact there)
    /// and 16 bits on an accelerator ([`accelerator_dtype`]).
    pub dtype: Option<DType>,
    /// Which forward pass runs a model both can run.
    pub engine: Engine,
    /// The precision weights are kept and computed at (`--dtype`). Quantized precisions run on
    /// the owned decoder only; `Auto` is bf16 there ([`crate::Precision::resolve`]) and `dtype`
    /// (or its default) elsewhere.
    pub precision: crate::precision::Precision,
}

/// The forward pass: the project's own decoder where it supports the model (llama-style, f32
/// on CPU today), else candle-transformers; or candle-transformers always, the reference that
/// tests and comparisons hold the own decoder to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    #[default]
    Best,
    Reference,
    /// The decoder pass on candle tensors ([`crate::decoder::tensor`]), which a GPU runs with
    /// `Best`, on any device: for tests and comparisons on the CPU.
    Tensor,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            limits: Limits::default(),
            device: Device::Cpu,
            dtype: None,
            engine: Engine::Best,
            precision: crate::precision::Precision::Auto,
        }
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the model has no config.json (neither embedded nor beside the weights)")]
    NoConfig,
    #[error("config.json is not valid JSON: {0}")]
    ConfigJson(String),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// What every model kind needs: the parsed config, architecture, tokenizer and compute dtype.
pub(crate) struct Common {
    pub arch: Architecture,
    pub config: serde_json::Value,
    pub tokenizer: Tokenizer,
    pub dtype: DType,
}

/// Reads and parses config.json.
pub fn config(source: &ModelSource) -> Result<serde_json::Value, LoadError> {
    let bytes = source.aux("config.json").ok_or(LoadError::NoConfig)?;
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| LoadError::ConfigJson(e.to_string()))?;
    if !value.is_object() {
        return Err(LoadError::ConfigJson("expected a JSON object".into()));
    }
    Ok(value)
}

pub(crate) fn common(source: &Arc<ModelSource>, opts: &LoadOptions) -> Result<Common, LoadError> {
    let config = config(source)?;
    let arch = Architecture::detect(&config)?;
    crate::arch::check_config_bounds(arch, &config)?;
    let tok_bytes = source
        .aux("tokenizer.json")
        .ok_or(TokenizerError::Missing)?;
    let tokenizer = tokenizer::load(tok_bytes)?;
    Ok(Common {
        arch,
        config,
        tokenizer,
        dtype: opts
            .dtype
            .or(opts.precision.candle_dtype())
            .unwrap_or_else(|| default_dtype(source, &opts.device)),
    })
}

fn default_dtype(source: &ModelSource, device: &Device) -> DType {
    if device.is_cpu() {
        return DType::F32;
    }
    accelerator_dtype(source)
}

/// The dtype weights are held at on a GPU when the user asked for no precision: 16 bits, as
/// the GPU's matrix units compute; an f16 file stays f16 (its values may exceed bf16's
/// precision), anything else (bf16, f32) is bf16 (f32's range, so no overflow).
pub fn accelerator_dtype(source: &ModelSource) -> DType {
    if source.tensors().any(|(_, t)| t.dtype == Dtype::F16) {
        DType::F16
    } else {
        DType::BF16
    }
}

/// End-of-sequence ids: generation_config.json, then config.json, then the tokenizer's
/// `eos_token` from tokenizer_config.json; all that are found count.
pub(crate) fn eos_ids(source: &ModelSource, tok: &Tokenizer) -> Vec<u32> {
    fn collect(v: Option<&serde_json::Value>, out: &mut Vec<u32>) {
        match v {
            Some(serde_json::Value::Number(n)) => {
                if let Some(id) = n.as_u64().and_then(|x| u32::try_from(x).ok()) {
                    out.push(id)
                }
            }
            Some(serde_json::Value::Array(a)) => a.iter().for_each(|x| collect(Some(x), out)),
            _ => {}
        }
    }
    let mut ids = Vec::new();
    for name in ["generation_config.json", "config.json"] {
        if let Ok(Some(v)) = source.aux_json::<serde_json::Value>(name) {
            collect(v.get("eos_token_id"), &mut ids);
        }
    }
    if let Ok(Some(v)) = source.aux_json::<serde_json::Value>("tokenizer_config.json") {
        let token = match v.get("eos_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(id) = token.and_then(|t| tok.token_to_id(&t)) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}
