//! What a model will allocate, estimated from its headers and configuration before anything is
//! built: a model file decides sizes (weights, rotary tables, KV cache), so a supervisor must be
//! able to refuse one that cannot fit, in its own process and with a clear reason, instead of
//! letting the worker find out by dying.

use crate::source::ModelSource;
use crate::LoadError;

/// Bytes a model needs, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The mapped weight files (address space) plus every tensor converted to the run
    /// precision (tensors used in place from the mapping add nothing).
    pub weights: u64,
    /// Rotary position tables (cos and sin) for every position the config allows.
    pub rotary: u64,
    /// Keys and values for `context` positions in every layer.
    pub kv_cache: u64,
    /// Working memory for one step: logits, attention scores and MLP activations at `context`.
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.rotary)
            .saturating_add(self.kv_cache)
            .saturating_add(self.activations)
    }
}

fn field(config: &serde_json::Value, name: &str) -> Option<u64> {
    config.get(name).and_then(serde_json::Value::as_u64)
}

/// Estimates what the model of `source` allocates with weights at `precision` (activations and
/// KV cache in f32) when it serves up to `context` positions (the model's own limit if `None`).
pub fn estimate(
    source: &ModelSource,
    precision: crate::Precision,
    context: Option<u64>,
) -> Result<MemoryEstimate, LoadError> {
    use crate::precision::{in_place, matrix_bytes, Role};
    let compute_bytes = 4u64;
    // A model without a usable config is refused before any arithmetic.
    crate::load::config(source)?;
    let converted: u64 = source
        .tensors()
        .map(|(f, t)| match t.shape[..] {
            [rows, cols] => {
                let wt = precision.weight_type(Role::Linear, cols);
                if in_place(t.dtype, wt, f.tensor_bytes(t)) {
                    0
                } else {
                    matrix_bytes(wt, rows, cols)
                }
            }
            _ => tensor_bytes(&t.shape, compute_bytes),
        })
        .fold(0u64, u64::saturating_add);
    let weights = source.weight_bytes().saturating_add(converted);
    sized(source, weights, compute_bytes, context)
}

/// Bytes of a tensor of `shape` at `per_element` bytes each (saturating).
fn tensor_bytes(shape: &[usize], per_element: u64) -> u64 {
    shape
        .iter()
        .map(|&d| d as u64)
        .fold(per_element, u64::saturating_mul)
}

/// Estimates what the model of `source` allocates in a GPU's memory when every tensor is held
/// at `dtype` there (weights, rotary tables, KV cache and activations alike) and it serves up
/// to `context` positions. The mapped files stay on the host and are not counted.
pub fn estimate_on_device(
    source: &ModelSource,
    dtype: candle_core::DType,
    context: Option<u64>,
) -> Result<MemoryEstimate, LoadError> {
    let bytes = dtype.size_in_bytes() as u64;
    let weights = source
        .tensors()
        .map(|(_, t)| tensor_bytes(&t.shape, bytes))
        .fold(0u64, u64::saturating_add);
    sized(source, weights, bytes, context)
}

/// [`estimate_on_device`] for quantized weights (candle's quantized kernels on the device, in
/// the decoder pass on candle tensors): each matrix at the block format `precision` gives it
/// (the output head at its own), the embedding rows at f16 (and once more in the head's block
/// format when the head is tied to them), every other tensor, the KV cache and the
/// activations at f32.
pub fn estimate_quantized_on_device(
    source: &ModelSource,
    precision: crate::Precision,
    context: Option<u64>,
) -> Result<MemoryEstimate, LoadError> {
    use crate::precision::{matrix_bytes, Role};
    let config = crate::load::config(source)?;
    let tied = config
        .get("tie_word_embeddings")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let weights = source
        .tensors()
        .map(|(_, t)| match (t.name.as_str(), &t.shape[..]) {
            ("model.embed_tokens.weight", &[rows, cols]) => {
                let head = matrix_bytes(precision.weight_type(Role::Head, cols), rows, cols);
                tensor_bytes(&t.shape, 2).saturating_add(if tied { head } else { 0 })
            }
            ("lm_head.weight", &[rows, cols]) => {
                matrix_bytes(precision.weight_type(Role::Head, cols), rows, cols)
            }
            (_, &[rows, cols]) => {
                matrix_bytes(precision.weight_type(Role::Linear, cols), rows, cols)
            }
            _ => tensor_bytes(&t.shape, 4),
        })
        .fold(0u64, u64::saturating_add);
    sized(source, weights, 4, context)
}

/// The parts sized by the configuration, for `weights` already counted and tensors of
/// `compute_bytes` each.
fn sized(
    source: &ModelSource,
    weights: u64,
    compute_bytes: u64,
    context: Option<u64>,
) -> Result<MemoryEstimate, LoadError> {
    let config = crate::load::config(source)?;
    let layers = field(&config, "num_hidden_layers").unwrap_or(0);
    let heads = field(&config, "num_attention_heads").unwrap_or(1).max(1);
    let kv_heads = field(&config, "num_key_value_heads").unwrap_or(heads);
    let hidden = field(&config, "hidden_size").unwrap_or(0);
    let head_dim = field(&config, "head_dim").unwrap_or(hidden / heads);
    let intermediate = field(&config, "intermediate_size").unwrap_or(4 * hidden);
    let vocab = field(&config, "vocab_size").unwrap_or(0);
    let max_positions = field(&config, "max_position_embeddings").unwrap_or(0);
    let context = context.map_or(max_positions, |c| c.min(max_positions.max(1)));
    let mul = |xs: &[u64]| xs.iter().fold(1u64, |a, &b| a.saturating_mul(b));
    Ok(MemoryEstimate {
        weights,
        rotary: mul(&[2, max_positions, head_dim, compute_bytes]),
        kv_cache: mul(&[2, layers, kv_heads, head_dim, context, compute_bytes]),
        activations: mul(&[vocab, compute_bytes])
            .saturating_add(mul(&[heads, context, context.min(8192), compute_bytes]))
            .saturating_add(mul(&[context, hidden + 2 * intermediate, compute_bytes])),
    })
}
