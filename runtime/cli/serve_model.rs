//! Starting one served model: verify its signature, load its tokenizer here, start its engine
//! (in a confined worker unless `--sandbox=off`), each step audited. `serve` runs it for every
//! model at start, and again for a model's new version when it is replaced.

use std::path::Path;
use std::sync::Arc;

use crate::open::OpenOptions;
use crate::server::models::{ModelSpec, ServedModel};
use crate::server::{engine, Metrics, ServeConfig};
use crate::worker::{ConfinedModel, Task, WorkerSettings};

/// Everything a model's start needs besides its spec.
pub(super) struct ModelStarter {
    pub opts: OpenOptions,
    /// `None`: in process (`--sandbox=off`).
    pub worker: Option<WorkerSettings>,
    /// The sandbox mode, as recorded.
    pub sandbox: String,
    pub config: ServeConfig,
    pub audit: crate::audit::AuditLog,
    pub metrics: Arc<Metrics>,
    pub runtime: tokio::runtime::Handle,
}

/// The name a model is served under when none is given: its file or directory name.
pub(super) fn default_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".safetensors")
        .unwrap_or(&name)
        .to_string()
}

impl ModelStarter {
    fn max_sequences(&self) -> usize {
        self.config
            .max_sequences
            .unwrap_or(crate::server::config::DEFAULT_MAX_SEQUENCES)
    }

    /// Verifies and starts `spec` as version `version`. Every outcome is recorded
    /// (`model_verification`, then `sandbox_started`); a model that fails either is not served.
    pub fn start(&self, spec: &ModelSpec, version: u64) -> Result<ServedModel, String> {
        let mut opts = self.opts.clone();
        // Each model's own signature (none given: the file beside it).
        opts.signature = spec.signature.clone();
        let path = &spec.path;
        let verified = crate::open_verified(path, &opts);
        let mut rec = crate::audit::AuditRecord::event("model_verification");
        rec.model = Some(spec.name.clone());
        let mut signer = None;
        match &verified {
            Ok((_, Some(v))) => {
                rec.outcome = Some("verified".into());
                rec.detail = Some(format!(
                    "{}: signer {}, mode {}, {} files, {} bytes",
                    path.display(),
                    v.signer,
                    v.signer.mode(),
                    v.files,
                    v.bytes
                ));
                signer = Some(v.signer.to_string());
            }
            Ok((_, None)) => {
                rec.outcome = Some("unverified_allow_unsigned".into());
                rec.detail = Some(path.display().to_string());
            }
            Err(e) => {
                rec.outcome = Some("refused".into());
                rec.detail = Some(format!("{}: {e}", path.display()));
            }
        }
        self.audit
            .append_blocking(rec)
            .map_err(|e| format!("cannot record the verification: {e}"))?;
        let (source, verification) = verified.map_err(|e| format!("{}: {e}", path.display()))?;
        // The tokenizer and chat template, loaded here: the server counts and bounds prompts
        // itself.
        let encoder = Arc::new(
            securerun_models::PromptEncoder::load(&source)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        );
        // The task from the architecture the models crate recognises (an unknown or missing
        // model type is refused here, before a worker starts).
        let is_embedder = securerun_models::detect(&source)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .task()
            == securerun_models::Task::Embeddings;
        let backend = match self.worker.clone() {
            Some(mut settings) => {
                // The memory estimate covers the longest request this server accepts.
                settings.context_limit = Some(
                    self.config.max_prompt_tokens as u64 + u64::from(self.config.max_tokens_cap),
                );
                settings.precision = opts.precision;
                settings.max_sequences = self.max_sequences();
                settings.sequences_by_memory = self.config.max_sequences.is_none();
                let task = if is_embedder {
                    Task::Embed
                } else {
                    Task::Generate
                };
                let started =
                    ConfinedModel::start(source, task, opts.limits, settings).map(|mut m| {
                        // A replacement worker (after a crash) must compute with the verified
                        // bytes: the signature is checked again over the files it will receive,
                        // and a mismatch refuses the worker (recorded as a failed request and
                        // restart).
                        if verification.is_some() {
                            let trust = opts.trust.clone();
                            let signature = opts
                                .signature
                                .clone()
                                .unwrap_or_else(|| crate::signing::default_signature_path(path));
                            m.set_reverify(Box::new(move |source| {
                                crate::signing::verify_source(source, &signature, &trust, &())
                                    .map(|_| ())
                                    .map_err(|e| e.to_string())
                            }));
                        }
                        m
                    });
                let mut rec = crate::audit::AuditRecord::event("sandbox_started");
                rec.model = Some(spec.name.clone());
                rec.outcome = Some(self.sandbox.clone());
                rec.detail = Some(match &started {
                    Ok(m) => {
                        let layers = m
                            .layers()
                            .iter()
                            .map(|l| {
                                let state = if l.enforced {
                                    "enforced"
                                } else {
                                    "NOT enforced"
                                };
                                format!("{} {state}", l.name)
                            })
                            .collect::<Vec<_>>()
                            .join(", ");
                        format!("{layers}; {} sequences at once", m.sequences())
                    }
                    Err(e) => format!("worker failed to start: {e}"),
                });
                self.audit
                    .append_blocking(rec)
                    .map_err(|e| format!("cannot record the sandbox: {e}"))?;
                let m = Box::new(started.map_err(|e| e.to_string())?);
                if is_embedder {
                    engine::Backend::Embed(m)
                } else {
                    engine::Backend::Text(m)
                }
            }
            None => {
                let mut rec = crate::audit::AuditRecord::event("sandbox_started");
                rec.model = Some(spec.name.clone());
                rec.outcome = Some(self.sandbox.clone());
                rec.detail = Some("inference runs in the server process, unconfined".into());
                self.audit
                    .append_blocking(rec)
                    .map_err(|e| format!("cannot record the sandbox: {e}"))?;
                // The verified source itself: the path is not opened (or verified) again.
                let err = |e: crate::open::Error| format!("{}: {e}", path.display());
                if is_embedder {
                    engine::Backend::EmbedInProcess(Box::new(
                        crate::load_embedder(&source, &opts).map_err(err)?,
                    ))
                } else {
                    engine::Backend::TextInProcess(Box::new(
                        crate::load_text_model(&source, &opts).map_err(err)?,
                    ))
                }
            }
        };
        let engine = engine::Engine::start(
            spec.name.clone(),
            backend,
            self.config.queue,
            self.max_sequences(),
            self.audit.clone(),
            self.metrics.clone(),
            self.runtime.clone(),
        );
        Ok(ServedModel {
            spec: spec.clone(),
            engine,
            encoder,
            loaded_at: crate::tokens::now(),
            version,
            signer,
        })
    }
}
