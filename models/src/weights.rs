//! A candle `VarBuilder` backend that reads tensors from a [`ModelSource`]'s validated mappings,
//! so the bytes inference uses are exactly the bytes that were validated (and, later, verified).

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::source::ModelSource;
use crate::strict_safetensors::Dtype;

/// Converts a safetensors dtype to candle's, if candle can hold it.
pub fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

struct SourceBackend(Arc<ModelSource>);

impl SourceBackend {
    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((file, info)) = self.0.tensor(name) else {
            candle_core::bail!("tensor {name:?} is missing from the model")
        };
        let Some(dtype) = candle_dtype(info.dtype) else {
            candle_core::bail!(
                "tensor {name:?} has dtype {} which cannot be loaded",
                info.dtype
            )
        };
        let tensor = Tensor::from_raw_buffer(file.tensor_bytes(info), dtype, &info.shape, dev)?;
        file.release_pages(info);
        Ok(tensor)
    }
}

impl SimpleBackend for SourceBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dev)?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "tensor {name:?} has shape {:?}, the configuration expects {:?}",
                tensor.dims(),
                s.dims()
            )
        }
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensor(name).is_some()
    }
}

/// A `VarBuilder` over the model's mapped weights, converting to `dtype` on `device`.
pub fn var_builder(source: Arc<ModelSource>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SourceBackend(source)), dtype, device.clone())
}
