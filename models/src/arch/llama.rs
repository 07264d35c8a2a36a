//! Llama family (Llama 2/3, SmolLM2, TinyLlama) via candle-transformers: the reference the owned
//! decoder ([`super::owned`]) is tested against, and the path for what it does not run.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;

use super::{build, input, last_logits, ArchError, Architecture, CausalLm};

pub struct Model {
    inner: llama::Llama,
    cache: llama::Cache,
    config: llama::Config,
    dtype: DType,
    device: Device,
}

impl Model {
    pub fn load(
        config: llama::LlamaConfig,
        vb: VarBuilder<'static>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ArchError> {
        let config = config.into_config(false);
        let inner = build(Architecture::Llama, || llama::Llama::load(vb, &config))?;
        let cache = build(Architecture::Llama, || {
            llama::Cache::new(true, dtype, &config, device)
        })?;
        Ok(Model {
            inner,
            cache,
            config,
            dtype,
            device: device.clone(),
        })
    }
}

impl CausalLm for Model {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor> {
        let x = input(tokens, &self.device)?;
        last_logits(self.inner.forward(&x, pos, &mut self.cache)?)
    }

    fn reset(&mut self) {
        // The cache also holds the rotary tables; rebuilding it is cheap next to a forward pass.
        if let Ok(cache) = llama::Cache::new(true, self.dtype, &self.config, &self.device) {
            self.cache = cache;
        }
    }

    fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }
}
