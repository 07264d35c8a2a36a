//! Llama (Llama 2/3 without rope scaling, SmolLM2, TinyLlama): the shared forward pass as is.

use candle_transformers::models::llama::LlamaConfig;

use super::{Shape, Spec, Variant};

/// The owned decoder's spec for this config, or `None` where it differs from the shared pass
/// (rope scaling: candle-transformers runs those).
pub fn spec(c: &LlamaConfig) -> Option<Spec> {
    if c.rope_scaling.is_some() || c.num_attention_heads == 0 {
        return None;
    }
    let spec = Spec {
        shape: Shape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.hidden_size / c.num_attention_heads,
            vocab: c.vocab_size,
            rms_eps: c.rms_norm_eps as f32,
            rope_theta: c.rope_theta,
            max_context: c.max_position_embeddings,
            sliding_window: None,
        },
        qkv_bias: false,
        qk_norm: false,
        tied: c.tie_word_embeddings.unwrap_or(false),
        variant: Variant::default(),
    };
    (c.hidden_size.is_multiple_of(c.num_attention_heads) && spec.valid()).then_some(spec)
}
