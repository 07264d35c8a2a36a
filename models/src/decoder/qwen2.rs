//! Qwen2 / Qwen2.5: llama with biases on the Q, K and V projections.

use candle_nn::Activation;
use candle_transformers::models::qwen2::Config;

use super::{Shape, Spec, Variant};

pub fn spec(c: &Config, raw: &serde_json::Value) -> Option<Spec> {
    // Per-layer sliding windows (`max_window_layers`) are left to candle-transformers.
    if c.hidden_act != Activation::Silu
        || c.use_sliding_window
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
            head_dim: c.hidden_size / c.num_attention_heads,
            vocab: c.vocab_size,
            rms_eps: c.rms_norm_eps as f32,
            rope_theta: c.rope_theta as f32,
            max_context: c.max_position_embeddings,
            sliding_window: None,
        },
        qkv_bias: true,
        qk_norm: false,
        tied: c.tie_word_embeddings,
        variant: Variant::default(),
    };
    (c.hidden_size.is_multiple_of(c.num_attention_heads) && spec.valid()).then_some(spec)
}
