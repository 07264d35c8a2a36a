//! Phi-3: llama with Q, K and V fused in one projection (`qkv_proj`) and gate and up in another
//! (`gate_up_proj`); the loader splits them by rows (in place when the type allows).

use candle_nn::Activation;
use candle_transformers::models::phi3::Config;

use super::{Shape, Spec, Variant};

pub fn spec(c: &Config, raw: &serde_json::Value) -> Option<Spec> {
    // Long-context rotary scaling (`longrope`) and partial rotary dimensions are left to
    // candle-transformers. The configuration's `sliding_window` is ignored, as the reference
    // ignores it.
    if c.hidden_act != Activation::Silu
        || super::has_rope_scaling(raw)
        || c.partial_rotary_factor.is_some_and(|f| f != 1.0)
        || c.num_attention_heads == 0
        || !c.hidden_size.is_multiple_of(c.num_attention_heads)
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
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
            rms_eps: c.rms_norm_eps as f32,
            rope_theta: c.rope_theta as f32,
            max_context: c.max_position_embeddings,
            sliding_window: None,
        },
        qkv_bias: false,
        qk_norm: false,
        tied: c.tie_word_embeddings,
        variant: Variant {
            fused_projections: true,
            ..Variant::default()
        },
    };
    spec.valid().then_some(spec)
}
