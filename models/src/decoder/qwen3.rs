//! Qwen3: llama with an explicit head size and per-head RMSNorm of Q and K before rotary.

use candle_nn::Activation;
use candle_transformers::models::qwen3::Config;

use super::{Shape, Spec, Variant};

pub fn spec(c: &Config, raw: &serde_json::Value) -> Option<Spec> {
    // Attention biases (also on the output projection) and sliding windows are left to
    // candle-transformers.
    if c.hidden_act != Activation::Silu
        || c.attention_bias
        || c.use_sliding_window
        || super::has_rope_scaling(raw)
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
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            rms_eps: c.rms_norm_eps as f32,
            rope_theta: c.rope_theta as f32,
            max_context: c.max_position_embeddings,
            sliding_window: None,
        },
        qkv_bias: false,
        qk_norm: true,
        tied: c.tie_word_embeddings,
        variant: Variant::default(),
    };
    spec.valid().then_some(spec)
}
