//! Phi-3 via candle-transformers.

use candle_core::Device;
use candle_nn::VarBuilder;
use candle_transformers::models::phi3;

use super::{build, ArchError, Architecture};

pub struct Model {
    inner: phi3::Model,
    max_context: usize,
    device: Device,
}

impl Model {
    pub fn load(config: phi3::Config, vb: VarBuilder<'static>) -> Result<Self, ArchError> {
        let device = vb.device().clone();
        let inner = build(Architecture::Phi3, || phi3::Model::new(&config, vb))?;
        Ok(Model {
            inner,
            max_context: config.max_position_embeddings,
            device,
        })
    }
}

super::self_cached_causal_lm!(Model);
