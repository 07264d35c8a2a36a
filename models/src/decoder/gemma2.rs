//! Gemma 2: embeddings scaled by √hidden, norms that multiply by `1 + w`, a GELU-gated MLP,
//! "sandwich" norms (the attention and MLP outputs normed again before each residual add),
//! soft-capped attention scores and logits, queries scaled by `query_pre_attn_scalar`, a
//! sliding window on even layers only, and the embedding as output head.

use candle_nn::Activation;
use candle_transformers::models::gemma2::Config;

use super::{Shape, Spec, Variant};

pub fn spec(c: &Config, raw: &serde_json::Value) -> Option<Spec> {
    if !matches!(
        c.hidden_activation,
        Activation::GeluPytorchTanh | Activation::NewGelu
    ) || c.attention_bias
        || super::has_rope_scaling(raw)
        || c.query_pre_attn_scalar == 0
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
            sliding_window: c.sliding_window,
        },
        qkv_bias: false,
        qk_norm: false,
        tied: true,
        variant: Variant {
            gelu_gate: true,
            norm_plus_one: true,
            sandwich_norms: true,
            scale_embeddings: true,
            window_on_even_layers: true,
            attn_softcap: c.attn_logit_softcapping.map(|v| v as f32),
            final_softcap: c.final_logit_softcapping.map(|v| v as f32),
            query_scale: Some(1.0 / (c.query_pre_attn_scalar as f32).sqrt()),
            ..Variant::default()
        },
    };
    spec.valid().then_some(spec)
}
