//! Opening models: the one path by which the CLI and library users get a runnable model, so
//! every check (header validation, signature verification; confinement next) applies to both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::signing::{self, SigningError, TrustPolicy, Verified};
use crate::worker::{ConfinedModel, Task, WorkerError, WorkerSettings};

use securerun_models::{
    Device, EmbedError, Embedder, GenerateError, Limits, LoadError, LoadOptions, ModelSource,
    SourceError, TextModel,
};

/// How to open a model.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Safetensors header limits.
    pub limits: Limits,
    /// Who is trusted to sign models (keys, CAs, keyless identities).
    pub trust: TrustPolicy,
    /// Signature file (default: `model.sig` in a directory, `FILE.sig` beside a file).
    pub signature: Option<PathBuf>,
    /// Run a model without a valid signature from a trusted key. Off by default: an unsigned,
    /// tampered or untrusted model is refused.
    pub allow_unsigned: bool,
    /// Where to compute.
    pub device: DeviceChoice,
    /// Draw a progress bar on stderr while hashing a large model, if stderr is a terminal.
    pub progress: bool,
    /// The precision weights are kept and computed at (`--dtype`; see `securerun_models::precision`).
    pub precision: securerun_models::Precision,
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
    /// Whether this build and host can use the device (CUDA needs the `cuda` feature).
    pub fn check(self) -> Result<(), Error> {
        self.open().map(drop)
    }

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
    #[error("{model}: no signature at {signature}; sign the model (`securerun sign`) or pass --allow-unsigned")]
    Unsigned { model: PathBuf, signature: PathBuf },
    #[error("nothing is trusted to sign models: pass --trust-key PUB, --trust-ca CA.pem or --identity/--issuer, or add a key with `securerun trust add PUB`")]
    NoTrustedKeys,
    #[error("{model}: signature verification failed: {source}")]
    Verification {
        model: PathBuf,
        source: SigningError,
    },
    #[error("cannot use device {device}: {reason} (CUDA needs a build with `--features cuda`)")]
    Device { device: String, reason: String },
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("a confined worker computes on the CPU only; pass --sandbox=off to use {0} (see README, CUDA)")]
    ConfinedDevice(String),
}

/// Resolves and validates a model directory or single file, then verifies its signature over
/// the very bytes the loader holds (unless `allow_unsigned`). Returns what was verified.
pub fn open_verified(
    path: &Path,
    opts: &OpenOptions,
) -> Result<(Arc<ModelSource>, Option<Verified>), Error> {
    let source = ModelSource::open(path, &opts.limits)?;
    if opts.allow_unsigned {
        return Ok((Arc::new(source), None));
    }
    if opts.trust.is_empty() {
        return Err(Error::NoTrustedKeys);
    }
    let signature = opts
        .signature
        .clone()
        .unwrap_or_else(|| signing::default_signature_path(path));
    if !signature.exists() {
        return Err(Error::Unsigned {
            model: path.to_path_buf(),
            signature,
        });
    }
    let bar = signing::progress::TerminalProgress::new("verifying");
    let progress: &dyn signing::Progress = if opts.progress { &bar } else { &() };
    let verified =
        signing::verify_source(&source, &signature, &opts.trust, progress).map_err(|source| {
            Error::Verification {
                model: path.to_path_buf(),
                source,
            }
        })?;
    Ok((Arc::new(source), Some(verified)))
}

/// [`open_verified`] without the verification report.
pub fn open_source(path: &Path, opts: &OpenOptions) -> Result<Arc<ModelSource>, Error> {
    open_verified(path, opts).map(|(source, _)| source)
}

fn load_options(opts: &OpenOptions) -> Result<LoadOptions, Error> {
    Ok(LoadOptions {
        limits: opts.limits,
        device: opts.device.open()?,
        precision: opts.precision,
        ..Default::default()
    })
}

/// Opens a text-generation model.
pub fn open_text_model(path: &Path, opts: &OpenOptions) -> Result<TextModel, Error> {
    load_text_model(&open_source(path, opts)?, opts)
}

/// Opens a sentence-embedding model.
pub fn open_embedder(path: &Path, opts: &OpenOptions) -> Result<Embedder, Error> {
    load_embedder(&open_source(path, opts)?, opts)
}

/// Loads a text-generation model from a source already opened and verified
/// ([`open_verified`]): the weights are those bytes, not the path opened again.
pub fn load_text_model(source: &Arc<ModelSource>, opts: &OpenOptions) -> Result<TextModel, Error> {
    Ok(TextModel::load(source, &load_options(opts)?)?)
}

/// Loads a sentence-embedding model from a source already opened and verified.
pub fn load_embedder(source: &Arc<ModelSource>, opts: &OpenOptions) -> Result<Embedder, Error> {
    Ok(Embedder::load(source, &load_options(opts)?)?)
}

/// Opens a model in a confined worker process: resolution and signature verification happen
/// here, in the supervisor; the worker receives the verified files as descriptors and parses
/// them only after it is confined. `settings` defaults to [`WorkerSettings::for_model`].
pub fn open_confined(
    path: &Path,
    opts: &OpenOptions,
    task: Task,
    settings: Option<WorkerSettings>,
) -> Result<ConfinedModel, Error> {
    if let DeviceChoice::Cuda(n) = opts.device {
        // A build without CUDA says so first; with CUDA, the worker profile is CPU-only so far.
        opts.device.open()?;
        return Err(Error::ConfinedDevice(format!("cuda:{n}")));
    }
    let source = open_source(path, opts)?;
    let mut settings = match settings {
        Some(s) => s,
        None => WorkerSettings::for_model(source.weight_bytes())
            .map_err(|e| WorkerError::Spawn(e.to_string()))?,
    };
    settings.precision = opts.precision;
    Ok(ConfinedModel::start(source, task, opts.limits, settings)?)
}
