//! Architectures, detected from `config.json`, each in its own file over candle-transformers.

/// [`CausalLm`] for a candle-transformers model that keeps its own KV cache: a struct with
/// `inner` (its `forward(&x, pos)` and `clear_kv_cache()`), `device` and `max_context`.
macro_rules! self_cached_causal_lm {
    ($model:ty) => {
        impl super::CausalLm for $model {
            fn forward(
                &mut self,
                tokens: &[u32],
                pos: usize,
            ) -> candle_core::Result<candle_core::Tensor> {
                let x = super::input(tokens, &self.device)?;
                super::last_logits(self.inner.forward(&x, pos)?)
            }

            fn reset(&mut self) {
                self.inner.clear_kv_cache();
            }

            fn max_context(&self) -> usize {
                self.max_context
            }
        }
    };
}
pub(crate) use self_cached_causal_lm;

mod bert;
mod gemma2;
mod llama;
mod llama_quantized;
mod mistral;
mod on_device;
mod owned;
mod phi3;
mod qwen2;
mod qwen3;

use candle_core::{DType, Device, Tensor};

pub use bert::{BertEncoder, Pooling};

/// The model families securerun can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Bert,
}

/// `model_type` values accepted, and what they map to.
const SUPPORTED: &[(&str, Architecture)] = &[
    ("llama", Architecture::Llama),
    ("mistral", Architecture::Mistral),
    ("qwen2", Architecture::Qwen2),
    ("qwen3", Architecture::Qwen3),
    ("phi3", Architecture::Phi3),
    ("gemma2", Architecture::Gemma2),
    ("bert", Architecture::Bert),
];

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    TextGeneration,
    Embeddings,
}

impl Architecture {
    /// Detects the architecture from a parsed `config.json`.
    pub fn detect(config: &serde_json::Value) -> Result<Self, ArchError> {
        let model_type = config.get("model_type").and_then(|v| v.as_str());
        let Some(model_type) = model_type else {
            return Err(ArchError::NoModelType);
        };
        SUPPORTED
            .iter()
            .find(|(name, _)| *name == model_type)
            .map(|(_, arch)| *arch)
            .ok_or_else(|| ArchError::Unsupported {
                model_type: model_type.to_string(),
            })
    }

    pub fn name(self) -> &'static str {
        SUPPORTED
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }

    pub fn task(self) -> Task {
        match self {
            Architecture::Bert => Task::Embeddings,
            _ => Task::TextGeneration,
        }
    }
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a model's architecture could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error(
        "config.json has no \"model_type\"; supported model types: {}",
        supported_list()
    )]
    NoModelType,
    #[error(
        "unsupported model_type {model_type:?}; supported model types: {}",
        supported_list()
    )]
    Unsupported { model_type: String },
    #[error("config.json does not match the {arch} configuration: {reason}")]
    Config { arch: &'static str, reason: String },
    #[error("cannot build the {arch} model from these weights: {reason}")]
    Weights { arch: &'static str, reason: String },
    #[error("--dtype {precision} needs the project's own decoder, which does not run this {arch} configuration yet; use f32, bf16 or f16")]
    Precision {
        arch: &'static str,
        precision: crate::precision::Precision,
    },
    #[error("{arch} is an {task} model, not usable for {wanted}")]
    WrongTask {
        arch: &'static str,
        task: &'static str,
        wanted: &'static str,
    },
}

/// A decoder-only language model with a KV cache.
pub trait CausalLm: Send {
    // Implementations call candle, which can panic on shapes it did not expect; callers go
    // through [`forward_guarded`].
    /// Feeds `tokens` at positions `pos..pos + tokens.len()` and returns the next-token logits
    /// (f32, shape `[vocab]`) for the last position.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Tensor>;
    /// The logits of every position of `tokens` fed at `pos..` (`[tokens][vocab]`, f32), for
    /// scoring. By default one forward pass per token.
    fn forward_all(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        let mut out = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            out.extend(self.forward(&[t], pos + i)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
    /// Forgets the KV cache.
    fn reset(&mut self);
    /// Largest context (prompt + generated tokens) the model supports.
    fn max_context(&self) -> usize;
    /// The project's own decoder behind this model, which can run several sequences per pass
    /// (none for the candle-transformers families).
    fn decoder(&self) -> Option<&crate::decoder::Decoder> {
        None
    }
    /// The decoder pass on candle tensors behind this model (a GPU's), which batches too.
    fn tensor_decoder(&self) -> Option<&crate::decoder::tensor::TensorDecoder> {
        None
    }
}

/// Size fields of `config.json` and their upper bounds. candle allocates from some of these before
/// any weight is read (rotary tables from `max_position_embeddings`, KV caches), so a hostile
/// config could otherwise demand terabytes and abort the process; the bounds sit far above any
/// public model (Llama 3.1: 131,072 positions, 128,256 vocabulary).
const CONFIG_BOUNDS: &[(&str, u64)] = &[
    ("hidden_size", 1 << 16),
    ("intermediate_size", 1 << 18),
    ("num_hidden_layers", 1 << 10),
    ("num_attention_heads", 1 << 10),
    ("num_key_value_heads", 1 << 10),
    ("head_dim", 1 << 12),
    ("vocab_size", 1 << 22),
    ("max_position_embeddings", 1 << 20),
];

/// Checks that every size field present is a positive integer within [`CONFIG_BOUNDS`].
pub fn check_config_bounds(
    arch: Architecture,
    config: &serde_json::Value,
) -> Result<(), ArchError> {
    for (field, max) in CONFIG_BOUNDS {
        let Some(value) = config.get(*field) else {
            continue;
        };
        if value.is_null() {
            continue;
        }
        match value.as_u64() {
            Some(v) if v >= 1 && v <= *max => {}
            _ => {
                return Err(ArchError::Config {
                    arch: arch.name(),
                    reason: format!("{field} = {value} is outside 1..={max}"),
                })
            }
        }
    }
    Ok(())
}

/// Parses the architecture's own config type from `config.json`.
fn parse_config<T: serde::de::DeserializeOwned>(
    arch: Architecture,
    config: &serde_json::Value,
) -> Result<T, ArchError> {
    serde_json::from_value(config.clone()).map_err(|e| ArchError::Config {
        arch: arch.name(),
        reason: e.to_string(),
    })
}

/// Runs a candle model constructor, turning both errors and panics into [`ArchError::Weights`].
///
/// Some candle-transformers constructors `unwrap()` internally (llama's block loading does), so a
/// model file with a missing tensor would otherwise abort the process.
fn build<T>(
    arch: Architecture,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T, ArchError> {
    let err = |reason: String| ArchError::Weights {
        arch: arch.name(),
        reason,
    };
    match crate::panic_guard::catch(f) {
        Ok(Ok(model)) => Ok(model),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(panic) => Err(err(panic)),
    }
}

/// The owned decoder's spec for this model, if it runs it.
fn owned_spec(
    arch: Architecture,
    config: &serde_json::Value,
) -> Result<Option<crate::decoder::Spec>, ArchError> {
    use crate::decoder;
    Ok(match arch {
        Architecture::Llama => decoder::llama::spec(&parse_config(arch, config)?),
        Architecture::Mistral => decoder::mistral::spec(&parse_config(arch, config)?, config),
        Architecture::Qwen2 => decoder::qwen2::spec(&parse_config(arch, config)?, config),
        Architecture::Qwen3 => decoder::qwen3::spec(&parse_config(arch, config)?, config),
        Architecture::Phi3 => decoder::phi3::spec(&parse_config(arch, config)?, config),
        Architecture::Gemma2 => {
            let c: candle_transformers::models::gemma2::Config = parse_config(arch, config)?;
            // A cap of zero, a negative or a NaN cap would silently turn every score into NaN.
            for (key, cap) in [
                ("attn_logit_softcapping", c.attn_logit_softcapping),
                ("final_logit_softcapping", c.final_logit_softcapping),
            ] {
                if cap.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    return Err(ArchError::Config {
                        arch: arch.name(),
                        reason: format!("{key} must be a positive number"),
                    });
                }
            }
            decoder::gemma2::spec(&c, config)
        }
        Architecture::Bert => None,
    })
}

/// Builds a causal LM of the detected architecture: on the owned decoder where it runs the
/// model on this device (at `opts.precision`), else on candle-transformers at `default_dtype`
/// or the float precision asked for.
pub fn load_causal_lm(
    arch: Architecture,
    config: &serde_json::Value,
    source: &std::sync::Arc<crate::source::ModelSource>,
    opts: &crate::load::LoadOptions,
    default_dtype: DType,
) -> Result<Box<dyn CausalLm>, ArchError> {
    use crate::precision::Precision;
    if arch == Architecture::Bert {
        return Err(ArchError::WrongTask {
            arch: arch.name(),
            task: "embeddings",
            wanted: "text generation",
        });
    }
    let precision = opts.precision;
    if opts.engine == crate::load::Engine::Best && opts.device.is_cpu() {
        if let Some(spec) = owned_spec(arch, config)? {
            return Ok(Box::new(owned::Owned::load(arch, spec, source, precision)?));
        }
    }
    // On a device the own kernels do not run on (a GPU): the same pass on candle tensors,
    // batched like the own decoder, with float weights or candle's block formats.
    let on_device = match opts.engine {
        crate::load::Engine::Best => !opts.device.is_cpu(),
        crate::load::Engine::Tensor => true,
        crate::load::Engine::Reference => false,
    };
    if on_device {
        if let Some(spec) = owned_spec(arch, config)? {
            let dtype = precision.candle_dtype().unwrap_or(default_dtype);
            return Ok(Box::new(on_device::OnDevice::load(
                arch,
                spec,
                source,
                precision,
                dtype,
                &opts.device,
            )?));
        }
    }
    // Quantized weights on the reference engine (and a GPU, for a llama configuration the
    // shared pass does not run): candle's quantized llama.
    let own_decoder_would = opts.engine == crate::load::Engine::Best && opts.device.is_cpu();
    if matches!(
        precision,
        Precision::Q8_0 | Precision::Q4_0 | Precision::Q4K
    ) && arch == Architecture::Llama
        && !own_decoder_would
        && llama_quantized::supports(config)
    {
        return Ok(Box::new(llama_quantized::Model::load(
            config,
            source,
            precision,
            &opts.device,
        )?));
    }
    let dtype = match (precision, precision.candle_dtype()) {
        (_, Some(d)) => d,
        (Precision::Auto, None) => default_dtype,
        (p, None) => {
            return Err(ArchError::Precision {
                arch: arch.name(),
                precision: p,
            })
        }
    };
    let device = &opts.device;
    let vb = crate::weights::var_builder(source.clone(), dtype, device);
    Ok(match arch {
        Architecture::Llama => Box::new(llama::Model::load(
            parse_config(arch, config)?,
            vb,
            dtype,
            device,
        )?),
        Architecture::Mistral => Box::new(mistral::Model::load(parse_config(arch, config)?, vb)?),
        Architecture::Qwen2 => Box::new(qwen2::Model::load(parse_config(arch, config)?, vb)?),
        Architecture::Qwen3 => Box::new(qwen3::Model::load(parse_config(arch, config)?, vb)?),
        Architecture::Phi3 => Box::new(phi3::Model::load(parse_config(arch, config)?, vb)?),
        Architecture::Gemma2 => Box::new(gemma2::Model::load(parse_config(arch, config)?, vb)?),
        Architecture::Bert => unreachable!("refused above"),
    })
}

/// Runs one forward pass, turning a panic inside candle into an error.
pub fn forward_guarded(
    lm: &mut dyn CausalLm,
    tokens: &[u32],
    pos: usize,
) -> candle_core::Result<Tensor> {
    match crate::panic_guard::catch(|| lm.forward(tokens, pos)) {
        Ok(result) => result,
        Err(panic) => Err(candle_core::Error::Msg(format!(
            "model code panicked: {panic}"
        ))),
    }
}

/// Squeezes the various logits shapes candle models return (`[1, vocab]`, `[1, 1, vocab]`) to
/// `[vocab]` in f32.
fn last_logits(logits: Tensor) -> candle_core::Result<Tensor> {
    let vocab = logits.dims().last().copied().unwrap_or(0);
    logits
        .flatten_all()?
        .narrow(0, logits.elem_count() - vocab, vocab)?
        .to_dtype(DType::F32)
}

/// Feeds `tokens` as a `[1, n]` batch.
fn input(tokens: &[u32], device: &Device) -> candle_core::Result<Tensor> {
    Tensor::new(tokens, device)?.unsqueeze(0)
}
