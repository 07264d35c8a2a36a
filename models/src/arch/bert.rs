//! BERT-family sentence encoders (sentence-transformers layout) via candle-transformers.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert;

use super::{build, parse_config, ArchError, Architecture};

/// How token states become one sentence vector (sentence-transformers' Pooling module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

impl Pooling {
    /// Reads a sentence-transformers `1_Pooling/config.json`. Exactly one mode must be set.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, ArchError> {
        let flag = |k: &str| config.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let modes = [
            (flag("pooling_mode_mean_tokens"), Pooling::Mean),
            (flag("pooling_mode_cls_token"), Pooling::Cls),
            (flag("pooling_mode_max_tokens"), Pooling::Max),
        ];
        let unsupported = [
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
            "pooling_mode_lasttoken",
        ];
        if let Some(k) = unsupported.iter().find(|k| flag(k)) {
            return Err(ArchError::Config {
                arch: "bert",
                reason: format!("pooling mode {k} is not supported (mean, cls and max are)"),
            });
        }
        let chosen: Vec<Pooling> = modes
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, p)| *p)
            .collect();
        match chosen.as_slice() {
            [one] => Ok(*one),
            [] => Err(ArchError::Config {
                arch: "bert",
                reason: "pooling config enables no pooling mode".into(),
            }),
            _ => Err(ArchError::Config {
                arch: "bert",
                reason:
                    "pooling config enables several modes; concatenated pooling is not supported"
                        .into(),
            }),
        }
    }
}

/// The forward pass behind a sentence encoder.
enum Backend {
    /// The project's own, on the kernels ([`crate::encoder`]).
    Own(crate::encoder::Encoder),
    /// candle-transformers (the reference; accelerators; configurations the own one skips).
    Candle(bert::BertModel),
}

/// A sentence encoder: BERT, then pooling, then optional L2 normalization.
pub struct BertEncoder {
    model: Backend,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
    hidden_size: usize,
    device: Device,
}

impl BertEncoder {
    pub fn load(
        config: &serde_json::Value,
        vb: VarBuilder<'static>,
        pooling: Pooling,
        normalize: bool,
        max_seq_length: Option<usize>,
    ) -> Result<Self, ArchError> {
        let cfg: bert::Config = parse_config(Architecture::Bert, config)?;
        let device = vb.device().clone();
        let model = Backend::Candle(build(Architecture::Bert, || {
            bert::BertModel::load(vb, &cfg)
        })?);
        let max_tokens = max_seq_length
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        Ok(BertEncoder {
            model,
            pooling,
            normalize,
            max_tokens,
            hidden_size: cfg.hidden_size,
            device,
        })
    }

    /// Longest input, in tokens (special tokens included).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Inputs encoded together: the own encoder packs real tokens (no padding), so larger
    /// batches only mean more rows per weight read; candle pads to the longest input.
    pub fn batch_size(&self) -> usize {
        match self.model {
            Backend::Own(_) => 64,
            Backend::Candle(_) => 16,
        }
    }

    /// Embedding dimension.
    pub fn dimension(&self) -> usize {
        self.hidden_size
    }

    /// The encoder on the project's own forward pass (CPU), at `precision` (f32, bf16, f16;
    /// `auto` is f32, the reference's); `None` when this configuration is left to candle.
    pub fn load_own(
        config: &serde_json::Value,
        source: &std::sync::Arc<crate::source::ModelSource>,
        precision: crate::precision::Precision,
        pooling: Pooling,
        normalize: bool,
        max_seq_length: Option<usize>,
    ) -> Result<Option<Self>, ArchError> {
        let Some(shape) = crate::encoder::Shape::from_config(config) else {
            return Ok(None);
        };
        let precision = precision.for_task(crate::Task::Embeddings);
        let (hidden, positions) = (shape.hidden, shape.max_positions);
        let encoder = build(Architecture::Bert, || {
            let mut loader = crate::decoder::load::TensorLoader::new(source.clone(), precision);
            crate::encoder::Encoder::load(shape, &mut loader).map_err(candle_core::Error::Msg)
        })?;
        Ok(Some(BertEncoder {
            model: Backend::Own(encoder),
            pooling,
            normalize,
            max_tokens: max_seq_length.unwrap_or(positions).min(positions),
            hidden_size: hidden,
            device: Device::Cpu,
        }))
    }

    /// Encodes a batch of token sequences (already checked against [`Self::max_tokens`]).
    pub fn encode(&self, batch: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let model = match &self.model {
            Backend::Own(e) => {
                let states = e.forward(batch).map_err(candle_core::Error::Msg)?;
                return Ok(states
                    .iter()
                    .map(|s| pool(s, self.hidden_size, self.pooling, self.normalize))
                    .collect());
            }
            Backend::Candle(m) => m,
        };
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        if batch.is_empty() || longest == 0 {
            return Ok(vec![vec![0.0; self.hidden_size]; batch.len()]);
        }
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut mask = Vec::with_capacity(batch.len() * longest);
        for seq in batch {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(0u32, longest - seq.len()));
            mask.extend(std::iter::repeat_n(1u32, seq.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - seq.len()));
        }
        let shape = (batch.len(), longest);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = ids.zeros_like()?;
        let states = model.forward(&ids, &types, Some(&mask))?; // [b, l, h]
        let maskf = mask.to_dtype(states.dtype())?.unsqueeze(2)?; // [b, l, 1]
        let pooled = match self.pooling {
            Pooling::Mean => {
                let sum = states.broadcast_mul(&maskf)?.sum(1)?;
                let count = maskf.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
            Pooling::Cls => states.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Max => {
                // Padding positions get a large negative value so they never win.
                let neg = ((maskf.ones_like()? - &maskf)? * -1e9)?;
                states.broadcast_add(&neg)?.max(1)?
            }
        };
        let pooled = pooled.to_dtype(DType::F32)?;
        let pooled = if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        pooled.to_vec2()
    }
}

/// One input's token states (`[token][hidden]`) pooled into one vector, L2-normalized if asked
/// (as the candle path above, in f32).
fn pool(states: &[f32], hidden: usize, pooling: Pooling, normalize: bool) -> Vec<f32> {
    let tokens = states.len() / hidden;
    let mut v = vec![0f32; hidden];
    if tokens > 0 {
        match pooling {
            Pooling::Mean => {
                for row in states.chunks_exact(hidden) {
                    v.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                }
                v.iter_mut().for_each(|a| *a /= tokens as f32);
            }
            Pooling::Cls => v.copy_from_slice(&states[..hidden]),
            Pooling::Max => {
                v.fill(f32::NEG_INFINITY);
                for row in states.chunks_exact(hidden) {
                    v.iter_mut().zip(row).for_each(|(a, b)| *a = a.max(*b));
                }
            }
        }
    }
    if normalize {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}
