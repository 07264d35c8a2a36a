//! Llama (Llama 2/3 without rope scaling, SmolLM2, TinyLlama) on the owned decoder: what differs
//! from the shared forward is only the weight names and the config.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::LlamaConfig;

use super::{Decoder, Layer, Shape, Weights};

/// Whether the owned decoder runs this config at this precision (else candle-transformers).
pub fn supported(config: &LlamaConfig, dtype: DType, device: &candle_core::Device) -> bool {
    let kv = config
        .num_key_value_heads
        .unwrap_or(config.num_attention_heads);
    dtype == DType::F32
        && device.is_cpu()
        && config.rope_scaling.is_none()
        && config.num_attention_heads > 0
        && kv > 0
        && config.num_attention_heads.is_multiple_of(kv)
        && config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        && (config.hidden_size / config.num_attention_heads).is_multiple_of(2)
}

fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Vec<f32>> {
    let t: Tensor = vb.get(shape, name)?;
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Reads the weights (copied out of the verified mapping as f32) and builds the decoder.
pub fn load(config: &LlamaConfig, vb: &VarBuilder) -> candle_core::Result<Decoder> {
    let (hid, inter) = (config.hidden_size, config.intermediate_size);
    let heads = config.num_attention_heads;
    let kv_heads = config.num_key_value_heads.unwrap_or(heads);
    let head_dim = hid / heads;
    let (q_out, kv_out) = (heads * head_dim, kv_heads * head_dim);
    let m = vb.pp("model");
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let l = m.pp(format!("layers.{i}"));
        let (a, mlp) = (l.pp("self_attn"), l.pp("mlp"));
        layers.push(Layer {
            input_norm: get(&l.pp("input_layernorm"), &[hid], "weight")?,
            q: get(&a.pp("q_proj"), &[q_out, hid], "weight")?,
            k: get(&a.pp("k_proj"), &[kv_out, hid], "weight")?,
            v: get(&a.pp("v_proj"), &[kv_out, hid], "weight")?,
            o: get(&a.pp("o_proj"), &[hid, q_out], "weight")?,
            post_norm: get(&l.pp("post_attention_layernorm"), &[hid], "weight")?,
            gate: get(&mlp.pp("gate_proj"), &[inter, hid], "weight")?,
            up: get(&mlp.pp("up_proj"), &[inter, hid], "weight")?,
            down: get(&mlp.pp("down_proj"), &[hid, inter], "weight")?,
        });
    }
    let tied = config.tie_word_embeddings.unwrap_or(false);
    let weights = Weights {
        embed: get(&m.pp("embed_tokens"), &[config.vocab_size, hid], "weight")?,
        layers,
        norm: get(&m.pp("norm"), &[hid], "weight")?,
        lm_head: if tied {
            None
        } else {
            Some(get(&vb.pp("lm_head"), &[config.vocab_size, hid], "weight")?)
        },
    };
    Ok(Decoder::new(
        Shape {
            hidden: hid,
            intermediate: inter,
            layers: config.num_hidden_layers,
            heads,
            kv_heads,
            head_dim,
            vocab: config.vocab_size,
            rms_eps: config.rms_norm_eps as f32,
            rope_theta: config.rope_theta,
            max_context: config.max_position_embeddings,
        },
        weights,
    ))
}
