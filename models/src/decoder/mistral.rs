//! Mistral: llama with an explicit head size and a sliding attention window.

use candle_nn::Activation;
use candle_transformers::models::mistral::Config;

use super::{Shape, Spec, Variant};

pub fn spec(c: &Config, raw: &serde_json::Value) -> Option<Spec> {
    if c.hidden_act != Activation::Silu
        || super::has_rope_scaling(raw)
        || c.num_attention_heads == 0
    {
        return None;
    }
    let spec = Spec {
        shape: Shape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            vocab: c.vocab_size,
            rms_eps: c.rms_norm_eps as f32,
            rope_theta: c.rope_theta as f32,
            max_context: c.max_position_embeddings,
            sliding_window: c.sliding_window,
        },
        qkv_bias: false,
        qk_norm: false,
        tied: super::tied(raw),
        variant: Variant::default(),
    };
    spec.valid().then_some(spec)
}
