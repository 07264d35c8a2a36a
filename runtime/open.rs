//! Opening models: the one path by which the CLI and library users get a runnable model, so
//! every check (header validation now; signature verification and confinement in later layers)
//! applies to both.

use std::path::Path;
use std::sync::Arc;

use securerun_models::{
    Device, EmbedError, Embedder, GenerateError, Limits, LoadError, LoadOptions, ModelSource,
    SourceError, TextModel,
};

/// How to open a model.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Safetensors header limits.
    pub limits: Limits,
    /// Run a model without a valid signature. Signature verification is not implemented yet,
    /// so this currently changes nothing; it is accepted so scripts can already pass it.
    pub allow_unsigned: bool,
    /// Where to compute.
    pub device: DeviceChoice,
}

/// A compute device, as named on the command line: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; needs a build with `--features cuda`.
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; use cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceChoice {
    fn open(self) -> Result<Device, Error> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            // Without the `cuda` feature candle's stub backend returns "not compiled with cuda".
            DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| Error::Device {
                device: format!("cuda:{n}"),
                reason: e.to_string(),
            }),
        }
    }
}

/// Any error from opening or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("cannot use device {device}: {reason} (CUDA needs a build with `--features cuda`)")]
    Device { device: String, reason: String },
}

/// Resolves and validates a model directory or single file.
pub fn open_source(path: &Path, opts: &OpenOptions) -> Result<Arc<ModelSource>, Error> {
    Ok(Arc::new(ModelSource::open(path, &opts.limits)?))
}

fn load_options(opts: &OpenOptions) -> Result<LoadOptions, Error> {
    Ok(LoadOptions {
        limits: opts.limits,
        device: opts.device.open()?,
        dtype: None,
    })
}

/// Opens a text-generation model.
pub fn open_text_model(path: &Path, opts: &OpenOptions) -> Result<TextModel, Error> {
    let load = load_options(opts)?;
    let source = open_source(path, opts)?;
    Ok(TextModel::load(&source, &load)?)
}

/// Opens a sentence-embedding model.
pub fn open_embedder(path: &Path, opts: &OpenOptions) -> Result<Embedder, Error> {
    let load = load_options(opts)?;
    let source = open_source(path, opts)?;
    Ok(Embedder::load(&source, &load)?)
}
