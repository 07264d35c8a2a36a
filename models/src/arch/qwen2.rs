//! Qwen2 / Qwen2.5 via candle-transformers.

use candle_core::Device;
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2;

use super::{build, ArchError, Architecture};

pub struct Model {
    inner: qwen2::ModelForCausalLM,
    max_context: usize,
    device: Device,
}

impl Model {
    pub fn load(config: qwen2::Config, vb: VarBuilder<'static>) -> Result<Self, ArchError> {
        let device = vb.device().clone();
        let inner = build(Architecture::Qwen2, || {
            qwen2::ModelForCausalLM::new(&config, vb)
        })?;
        Ok(Model {
            inner,
            max_context: config.max_position_embeddings,
            device,
        })
    }
}

super::self_cached_causal_lm!(Model);
