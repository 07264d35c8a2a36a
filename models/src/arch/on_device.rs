//! Llama-style families on the decoder pass written on candle tensors
//! ([`crate::decoder::tensor`]): what a GPU runs them on, batched like the own decoder.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{build, ArchError, Architecture, CausalLm};
use crate::decoder::tensor::TensorDecoder;
use crate::decoder::Spec;
use crate::precision::Precision;
use crate::source::ModelSource;

pub struct OnDevice {
    decoder: TensorDecoder,
}

impl OnDevice {
    pub fn load(
        arch: Architecture,
        spec: Spec,
        source: &Arc<ModelSource>,
        precision: Precision,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ArchError> {
        let decoder = build(arch, || {
            TensorDecoder::load(spec, source, precision, dtype, device)
        })?;
        Ok(OnDevice { decoder })
    }
}

impl CausalLm for OnDevice {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor> {
        let logits = self.decoder.forward_own(tokens, pos, false)?;
        let n = logits.len();
        Tensor::from_vec(logits, n, &Device::Cpu)
    }

    fn forward_all(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        self.decoder.forward_own(tokens, pos, true)
    }

    fn reset(&mut self) {
        self.decoder.reset();
    }

    fn max_context(&self) -> usize {
        self.decoder.shape().max_context
    }

    fn tensor_decoder(&self) -> Option<&TensorDecoder> {
        Some(&self.decoder)
    }
}
