//! Gemma 2 via candle-transformers.

use candle_core::Device;
use candle_nn::VarBuilder;
use candle_transformers::models::gemma2;

use super::{build, ArchError, Architecture};

pub struct Model {
    inner: gemma2::Model,
    max_context: usize,
    device: Device,
}

impl Model {
    pub fn load(config: gemma2::Config, vb: VarBuilder<'static>) -> Result<Self, ArchError> {
        let device = vb.device().clone();
        let inner = build(Architecture::Gemma2, || {
            gemma2::Model::new(false, &config, vb)
        })?;
        Ok(Model {
            inner,
            max_context: config.max_position_embeddings,
            device,
        })
    }
}

super::self_cached_causal_lm!(Model);
