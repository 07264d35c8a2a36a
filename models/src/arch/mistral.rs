//! Mistral via candle-transformers.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mistral;

use super::{build, input, last_logits, ArchError, Architecture, CausalLm};

pub struct Model {
    inner: mistral::Model,
    max_context: usize,
    device: Device,
}

impl Model {
    pub fn load(config: mistral::Config, vb: VarBuilder<'static>) -> Result<Self, ArchError> {
        let device = vb.device().clone();
        let inner = build(Architecture::Mistral, || mistral::Model::new(&config, vb))?;
        Ok(Model {
            inner,
            max_context: config.max_position_embeddings,
            device,
        })
    }
}

impl CausalLm for Model {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor> {
        let x = input(tokens, &self.device)?;
        last_logits(self.inner.forward(&x, pos)?)
    }

    fn reset(&mut self) {
        self.inner.clear_kv_cache();
    }

    fn max_context(&self) -> usize {
        self.max_context
    }
}
