//! Llama-family models with quantized weights through candle's own quantized kernels, which
//! run on the CPU and on CUDA (`QMatMul`): the path for `--dtype q8_0|q4_0|q4_k` on a GPU,
//! where the project's own decoder (CPU kernels) cannot go, and the reference engine's
//! quantized path on the CPU.
//!
//! candle-transformers' quantized llama is built from GGUF content only, so the verified
//! safetensors weights are quantized here (on the CPU, one tensor at a time), written as GGUF
//! into memory with llama.cpp's names, metadata and query/key row order, and read back onto
//! the device. Nothing touches the filesystem.

use std::io::Cursor;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};

use super::{ArchError, Architecture};
use crate::precision::{Precision, Role};

pub struct Model {
    inner: ModelWeights,
    device: Device,
    max_context: usize,
}

/// The configuration fields this path reads.
#[derive(Debug, serde::Deserialize)]
struct Config {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

impl Config {
    /// candle's quantized llama derives the head size (even, whole) from the hidden size, shares
    /// KV heads evenly, and knows no rope scaling.
    fn supported(&self) -> bool {
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        heads > 0
            && kv_heads > 0
            && self.hidden_size.is_multiple_of(heads)
            && heads.is_multiple_of(kv_heads)
            && (self.hidden_size / heads).is_multiple_of(2)
            && self.head_dim.is_none_or(|d| d * heads == self.hidden_size)
            && self.rope_scaling.as_ref().is_none_or(|v| v.is_null())
    }
}

/// Whether candle's quantized llama can run the model `config` describes.
pub fn supports(config: &serde_json::Value) -> bool {
    serde_json::from_value::<Config>(config.clone()).is_ok_and(|c| c.supported())
}

fn default_rope_theta() -> f32 {
    10_000.0
}

/// The GGUF block format a `cols`-wide matrix gets under `precision` (the same plan as the own
/// decoder: the head keeps 8 bits under the 4-bit formats; a width the format cannot tile
/// stays f16).
fn ggml_type(precision: Precision, role: Role, cols: usize) -> GgmlDType {
    use crate::kernels::WeightType;
    match precision.weight_type(role, cols) {
        WeightType::Q8_0 => GgmlDType::Q8_0,
        WeightType::Q4_0 => GgmlDType::Q4_0,
        WeightType::Q4K => GgmlDType::Q4K,
        WeightType::F32 => GgmlDType::F32,
        _ => GgmlDType::F16,
    }
}

impl Model {
    pub fn load(
        config: &serde_json::Value,
        source: &std::sync::Arc<crate::source::ModelSource>,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ArchError> {
        let arch = Architecture::Llama;
        let refuse = |reason: String| ArchError::Config {
            arch: arch.name(),
            reason,
        };
        let c: Config = super::parse_config(arch, config)?;
        if !c.supported() {
            return Err(refuse(
                "rope_scaling, uneven heads, or a head_dim other than hidden_size / num_attention_heads is not supported with quantized weights here".into(),
            ));
        }
        let heads = c.num_attention_heads;
        let kv_heads = c.num_key_value_heads.unwrap_or(heads);
        let vb = crate::weights::var_builder(source.clone(), DType::F32, &Device::Cpu);
        let weights = super::build(arch, || {
            let mut tensors: Vec<(String, QTensor)> = Vec::new();
            let matrix = |gguf: String, hf: &str, role: Role, rows_per_head: Option<usize>| {
                let mut t = vb.get_unchecked(hf)?;
                if let Some(n_head) = rows_per_head {
                    t = to_interleaved_rope(&t, n_head)?;
                }
                let cols = t.dims().last().copied().unwrap_or(0);
                let q = QTensor::quantize(&t, ggml_type(precision, role, cols))?;
                Ok::<_, candle_core::Error>((gguf, q))
            };
            tensors.push(matrix(
                "token_embd.weight".into(),
                "model.embed_tokens.weight",
                if c.tie_word_embeddings {
                    Role::Head
                } else {
                    Role::Embedding
                },
                None,
            )?);
            if !c.tie_word_embeddings {
                tensors.push(matrix(
                    "output.weight".into(),
                    "lm_head.weight",
                    Role::Head,
                    None,
                )?);
            }
            for i in 0..c.num_hidden_layers {
                let hf = |n: &str| format!("model.layers.{i}.{n}.weight");
                let gg = |n: &str| format!("blk.{i}.{n}.weight");
                tensors.push(matrix(
                    gg("attn_q"),
                    &hf("self_attn.q_proj"),
                    Role::Linear,
                    Some(heads),
                )?);
                tensors.push(matrix(
                    gg("attn_k"),
                    &hf("self_attn.k_proj"),
                    Role::Linear,
                    Some(kv_heads),
                )?);
                tensors.push(matrix(
                    gg("attn_v"),
                    &hf("self_attn.v_proj"),
                    Role::Linear,
                    None,
                )?);
                tensors.push(matrix(
                    gg("attn_output"),
                    &hf("self_attn.o_proj"),
                    Role::Linear,
                    None,
                )?);
                tensors.push(matrix(
                    gg("ffn_gate"),
                    &hf("mlp.gate_proj"),
                    Role::Linear,
                    None,
                )?);
                tensors.push(matrix(
                    gg("ffn_up"),
                    &hf("mlp.up_proj"),
                    Role::Linear,
                    None,
                )?);
                tensors.push(matrix(
                    gg("ffn_down"),
                    &hf("mlp.down_proj"),
                    Role::Linear,
                    None,
                )?);
                for (g, h) in [
                    ("attn_norm", "input_layernorm"),
                    ("ffn_norm", "post_attention_layernorm"),
                ] {
                    let t = vb.get_unchecked(&hf(h))?;
                    tensors.push((gg(g), QTensor::quantize(&t, GgmlDType::F32)?));
                }
            }
            let norm = vb.get_unchecked("model.norm.weight")?;
            tensors.push((
                "output_norm.weight".into(),
                QTensor::quantize(&norm, GgmlDType::F32)?,
            ));
            Ok(tensors)
        })?;
        let metadata: Vec<(&str, gguf_file::Value)> = vec![
            (
                "general.architecture",
                gguf_file::Value::String("llama".into()),
            ),
            (
                "llama.attention.head_count",
                gguf_file::Value::U32(heads as u32),
            ),
            (
                "llama.attention.head_count_kv",
                gguf_file::Value::U32(kv_heads as u32),
            ),
            (
                "llama.block_count",
                gguf_file::Value::U32(c.num_hidden_layers as u32),
            ),
            (
                "llama.embedding_length",
                gguf_file::Value::U32(c.hidden_size as u32),
            ),
            (
                "llama.feed_forward_length",
                gguf_file::Value::U32(c.intermediate_size as u32),
            ),
            (
                "llama.rope.dimension_count",
                gguf_file::Value::U32((c.hidden_size / heads.max(1)) as u32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(c.rms_norm_eps as f32),
            ),
            ("llama.rope.freq_base", gguf_file::Value::F32(c.rope_theta)),
        ];
        let inner = super::build(arch, || {
            let mut gguf = Cursor::new(Vec::new());
            let md: Vec<(&str, &gguf_file::Value)> =
                metadata.iter().map(|(k, v)| (*k, v)).collect();
            let ts: Vec<(&str, &QTensor)> = weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
            gguf_file::write(&mut gguf, &md, &ts)?;
            drop(ts);
            drop(weights);
            gguf.set_position(0);
            let content = gguf_file::Content::read(&mut gguf)?;
            ModelWeights::from_gguf(content, &mut gguf, device)
        })?;
        Ok(Model {
            inner,
            device: device.clone(),
            // candle's quantized llama holds rotary tables for MAX_SEQ_LEN positions.
            max_context: c.max_position_embeddings.min(MAX_SEQ_LEN),
        })
    }
}

/// Hugging Face's query/key rows (each head's first half of rotary pairs, then its second
/// half) in llama.cpp's order (pairs adjacent), which candle's quantized llama rotates as
/// interleaved pairs.
fn to_interleaved_rope(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head.max(1) / 2;
    w.reshape((n_head, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

super::self_cached_causal_lm!(Model);
