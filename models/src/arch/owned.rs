//! Llama-style families on the project's own decoder ([`crate::decoder`]), at the run precision.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::{build, ArchError, Architecture, CausalLm};
use crate::decoder::{self, load::TensorLoader, Decoder, Spec};
use crate::precision::Precision;
use crate::source::ModelSource;

pub struct Owned {
    decoder: Decoder,
}

impl Owned {
    pub fn load(
        arch: Architecture,
        spec: Spec,
        source: &Arc<ModelSource>,
        precision: Precision,
    ) -> Result<Self, ArchError> {
        let decoder = build(arch, || {
            let mut loader = TensorLoader::new(source.clone(), precision);
            let weights =
                decoder::load_weights(&spec, &mut loader).map_err(candle_core::Error::Msg)?;
            Ok(Decoder::new(spec, weights))
        })?;
        Ok(Owned { decoder })
    }
}

impl CausalLm for Owned {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor> {
        let logits = self
            .decoder
            .forward(tokens, pos)
            .map_err(candle_core::Error::Msg)?;
        let n = logits.len();
        Tensor::from_vec(logits, n, &Device::Cpu)
    }

    fn forward_all(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        self.decoder
            .forward_all(tokens, pos)
            .map_err(candle_core::Error::Msg)
    }

    fn reset(&mut self) {
        self.decoder.reset();
    }

    fn max_context(&self) -> usize {
        self.decoder.shape().max_context
    }

    fn decoder(&self) -> Option<&Decoder> {
        Some(&self.decoder)
    }
}
