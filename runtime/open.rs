//! Opening models: the one path by which `run`, `embed`, `serve` and library users get a
//! runnable model. [`open`] validates the files, verifies the signature over the very bytes
//! the loader holds, and detects the architecture, once; the [`OpenedModel`] it returns is
//! what every later step (in-process load, confined worker, the server's tokenizer) starts
//! from, so nothing opens the path or verifies it a second time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::signing::{self, SigningError, TrustPolicy, Verified};
use crate::worker::{ConfinedModel, WorkerError, WorkerSettings};

use securerun_models::{
    Architecture, Device, EmbedError, Embedder, GenerateError, Limits, LoadError, LoadOptions,
    ModelSource, Precision, PromptEncoder, SourceError, Task, TextModel,
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
    pub precision: Precision,
    /// The confined worker's address-space budget in bytes (`--worker-memory`). `None`:
    /// [`crate::worker::supervisor::default_memory_budget`] of the verified weights.
    pub memory_budget: Option<u64>,
}

/// The highest GPU number `cuda:N` accepts (the NVIDIA driver's device nodes go to
/// `/dev/nvidia63`).
pub const MAX_CUDA_ORDINAL: usize = 63;

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
                .filter(|n| {
                    // Digits only, written one way (no sign, no leading zero): the spelling
                    // shown and recorded is the number the driver gets.
                    !n.is_empty()
                        && n.bytes().all(|b| b.is_ascii_digit())
                        && (n.len() == 1 || !n.starts_with('0'))
                })
                .and_then(|n| n.parse().ok())
                .filter(|&n| n <= MAX_CUDA_ORDINAL)
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    format!("unknown device {s:?}; use cpu, cuda or cuda:N (N from 0 to {MAX_CUDA_ORDINAL})")
                }),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    /// The spelling [`std::str::FromStr`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device in this process (in-process inference, `--sandbox=off`): for CUDA, the
    /// libraries and the driver, each failure its own clear error; never the CPU instead.
    fn open(self) -> Result<Device, Error> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => {
                let refused = |e: securerun_models::cuda::CudaError| Error::Device {
                    device: self.to_string(),
                    reason: e.to_string(),
                };
                securerun_models::cuda::load_libraries().map_err(refused)?;
                securerun_models::cuda::open_device(n)
                    .map(|(device, _)| device)
                    .map_err(refused)
            }
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
    #[error("cannot use device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("{model}: {architecture} is {}, not {}: use `securerun {}`", task_name(*found), task_name(*wanted), command_for(*found))]
    WrongTask {
        model: PathBuf,
        architecture: &'static str,
        found: Task,
        wanted: Task,
    },
}

fn task_name(task: Task) -> &'static str {
    match task {
        Task::TextGeneration => "a text-generation model",
        Task::Embeddings => "an embedding model",
    }
}

fn command_for(task: Task) -> &'static str {
    match task {
        Task::TextGeneration => "run",
        Task::Embeddings => "embed",
    }
}

/// A model opened once: its validated files, what verified them, what it is and how it will
/// run. Cheap to clone (the files are shared).
#[derive(Clone)]
pub struct OpenedModel {
    path: PathBuf,
    source: Arc<ModelSource>,
    verification: Option<Arc<Verified>>,
    architecture: Architecture,
    opts: OpenOptions,
    memory_budget: u64,
    encoder: Arc<OnceLock<Arc<PromptEncoder>>>,
}

impl std::fmt::Debug for OpenedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedModel")
            .field("path", &self.path)
            .field("architecture", &self.architecture)
            .field("verification", &self.verification)
            .field("precision", &self.run_precision())
            .field("memory_budget", &self.memory_budget)
            .finish_non_exhaustive()
    }
}

/// Opens a model directory or single file: validates its headers, verifies its signature over
/// the very bytes the loader holds (unless `allow_unsigned`), and detects its architecture
/// from its `config.json` (an unknown or missing model type is refused here, before any
/// weight is used).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<OpenedModel, Error> {
    let source = Arc::new(ModelSource::open(path, &opts.limits)?);
    let verification = if opts.allow_unsigned {
        None
    } else {
        Some(Arc::new(verify(path, &source, opts)?))
    };
    let architecture = securerun_models::detect(&source)?;
    let memory_budget = opts
        .memory_budget
        .unwrap_or_else(|| crate::worker::supervisor::default_memory_budget(source.weight_bytes()));
    Ok(OpenedModel {
        path: path.to_path_buf(),
        source,
        verification,
        architecture,
        opts: opts.clone(),
        memory_budget,
        encoder: Default::default(),
    })
}

fn signature_path(path: &Path, opts: &OpenOptions) -> PathBuf {
    opts.signature
        .clone()
        .unwrap_or_else(|| signing::default_signature_path(path))
}

fn verify(path: &Path, source: &ModelSource, opts: &OpenOptions) -> Result<Verified, Error> {
    if opts.trust.is_empty() {
        return Err(Error::NoTrustedKeys);
    }
    let signature = signature_path(path, opts);
    if !signature.exists() {
        return Err(Error::Unsigned {
            model: path.to_path_buf(),
            signature,
        });
    }
    let bar = signing::progress::TerminalProgress::new("verifying");
    let progress: &dyn signing::Progress = if opts.progress { &bar } else { &() };
    signing::verify_source(source, &signature, &opts.trust, progress).map_err(|source| {
        Error::Verification {
            model: path.to_path_buf(),
            source,
        }
    })
}

impl OpenedModel {
    /// The path it was opened from (for messages; never opened again).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated files, as verified.
    pub fn source(&self) -> &Arc<ModelSource> {
        &self.source
    }

    /// What the signature established; `None` when opened with `allow_unsigned`.
    pub fn verification(&self) -> Option<&Verified> {
        self.verification.as_deref()
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    pub fn task(&self) -> Task {
        self.architecture.task()
    }

    /// The precision asked for (`auto` stays `auto`: a 16-bit file keeps its own type).
    pub fn precision(&self) -> Precision {
        self.opts.precision
    }

    /// The precision the model computes at on this machine.
    pub fn run_precision(&self) -> Precision {
        self.opts.precision.for_task(self.task())
    }

    /// A confined worker's address-space budget: as asked, or from the verified weights.
    pub fn memory_budget(&self) -> u64 {
        self.memory_budget
    }

    /// The tokenizer and chat template (loaded once, shared).
    pub fn prompt_encoder(&self) -> Result<Arc<PromptEncoder>, Error> {
        if let Some(e) = self.encoder.get() {
            return Ok(e.clone());
        }
        let encoder = Arc::new(PromptEncoder::load(&self.source)?);
        Ok(self.encoder.get_or_init(|| encoder).clone())
    }

    /// Refuses, with [`Error::WrongTask`], a model that is not for `wanted`.
    pub fn require(&self, wanted: Task) -> Result<(), Error> {
        if self.task() == wanted {
            return Ok(());
        }
        Err(Error::WrongTask {
            model: self.path.clone(),
            architecture: self.architecture.name(),
            found: self.task(),
            wanted,
        })
    }

    fn load_options(&self) -> Result<LoadOptions, Error> {
        Ok(LoadOptions {
            limits: self.opts.limits,
            device: self.opts.device.open()?,
            precision: self.opts.precision,
            ..Default::default()
        })
    }

    /// Loads it in this process as a text-generation model.
    pub fn text_model(&self) -> Result<TextModel, Error> {
        self.require(Task::TextGeneration)?;
        Ok(TextModel::load(&self.source, &self.load_options()?)?)
    }

    /// Loads it in this process as a sentence-embedding model.
    pub fn embedder(&self) -> Result<Embedder, Error> {
        self.require(Task::Embeddings)?;
        Ok(Embedder::load(&self.source, &self.load_options()?)?)
    }

    /// Starts it in a confined worker process, for its own task: the worker receives the
    /// verified files as descriptors and parses them only after it is confined. Its memory
    /// budget and precision are this model's; a replacement worker (after a crash) starts only
    /// if the signature still verifies over the files it will receive.
    pub fn confined(&self, mut settings: WorkerSettings) -> Result<ConfinedModel, Error> {
        // A build without CUDA says so here; with CUDA, the worker opens the device itself,
        // confined, and a host without one is refused by the worker with its reason.
        if self.opts.device != DeviceChoice::Cpu && !securerun_models::cuda::built() {
            return Err(Error::Device {
                device: self.opts.device.to_string(),
                reason: securerun_models::cuda::CudaError::NotBuilt.to_string(),
            });
        }
        settings.device = self.opts.device;
        settings.precision = self.opts.precision;
        settings.memory_budget = Some(self.memory_budget);
        let mut model = ConfinedModel::start_with_encoder(
            self.source.clone(),
            self.prompt_encoder()?,
            self.task().into(),
            self.opts.limits,
            settings,
        )?;
        if self.verification.is_some() {
            let trust = self.opts.trust.clone();
            let signature = signature_path(&self.path, &self.opts);
            model.set_reverify(Box::new(move |source| {
                signing::verify_source(source, &signature, &trust, &())
                    .map(drop)
                    .map_err(|e| e.to_string())
            }));
        }
        Ok(model)
    }
}

/// Opens and loads a text-generation model in this process.
pub fn open_text_model(path: &Path, opts: &OpenOptions) -> Result<TextModel, Error> {
    open(path, opts)?.text_model()
}

/// Opens and loads a sentence-embedding model in this process.
pub fn open_embedder(path: &Path, opts: &OpenOptions) -> Result<Embedder, Error> {
    open(path, opts)?.embedder()
}

#[cfg(test)]
mod tests {
    use super::DeviceChoice;

    #[test]
    fn devices_are_read_one_way_and_within_range() {
        for (text, device) in [
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("cuda:7", DeviceChoice::Cuda(7)),
            ("cuda:63", DeviceChoice::Cuda(63)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(device), "{text}");
            if text.contains(':') || text == "cpu" {
                assert_eq!(device.to_string(), text);
            }
        }
        // A number the driver would get wrapped, or a second spelling of one it accepts.
        for text in [
            "cuda:64",
            "cuda:4294967296",
            "cuda:18446744073709551615",
            "cuda:+1",
            "cuda:01",
            "cuda:-1",
            "cuda:",
            "cuda: 0",
            "CUDA",
            "gpu",
        ] {
            assert!(text.parse::<DeviceChoice>().is_err(), "{text}");
        }
    }
}
