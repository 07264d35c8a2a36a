//! Starting one served model: verify its signature, load its tokenizer here, start its engine
//! (in a confined worker unless `--sandbox=off`), each step audited. `serve` runs it for every
//! model at start, and again for a model's new version when it is replaced.

use std::path::Path;
use std::sync::Arc;

use crate::open::OpenOptions;
use crate::server::models::{ModelSpec, ServedModel, StartError};
use crate::server::{engine, Metrics, ServeConfig};
use crate::worker::WorkerSettings;

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
    pub fn start(&self, spec: &ModelSpec, version: u64) -> Result<ServedModel, StartError> {
        let mut opts = self.opts.clone();
        // Each model's own signature (none given: the file beside it).
        opts.signature = spec.signature.clone();
        let path = &spec.path;
        let open_error = |source| StartError::Open {
            path: path.clone(),
            source,
        };
        let audit = |step: &'static str, rec| {
            self.audit
                .append_blocking(rec)
                .map_err(|source| StartError::Audit { step, source })
        };
        // Validated, verified and its architecture detected once; everything below starts
        // from this value, never from the path again.
        let opened = crate::open(path, &opts);
        let mut rec = crate::audit::AuditRecord::event("model_verification");
        rec.model = Some(spec.name.clone());
        match &opened {
            Ok(m) => match m.verification() {
                Some(v) => {
                    rec.outcome = Some("verified".into());
                    rec.detail = Some(format!(
                        "{}: signer {}, mode {}, {} files, {} bytes",
                        path.display(),
                        v.signer,
                        v.signer.mode(),
                        v.files,
                        v.bytes
                    ));
                }
                None => {
                    rec.outcome = Some("unverified_allow_unsigned".into());
                    rec.detail = Some(path.display().to_string());
                }
            },
            Err(e) => {
                rec.outcome = Some("refused".into());
                rec.detail = Some(format!("{}: {e}", path.display()));
            }
        }
        audit("verification", rec)?;
        let opened = opened.map_err(open_error)?;
        let signer = opened.verification().map(|v| v.signer.to_string());
        // The tokenizer and chat template: the server counts and bounds prompts itself.
        let encoder = opened.prompt_encoder().map_err(open_error)?;
        let is_embedder = opened.task() == securerun_models::Task::Embeddings;
        let mut rec = crate::audit::AuditRecord::event("sandbox_started");
        rec.model = Some(spec.name.clone());
        rec.outcome = Some(self.sandbox.clone());
        let backend = match self.worker.clone() {
            Some(mut settings) => {
                // The memory estimate covers the longest request this server accepts.
                settings.context_limit = Some(
                    self.config.max_prompt_tokens as u64 + u64::from(self.config.max_tokens_cap),
                );
                settings.max_sequences = self.max_sequences();
                settings.sequences_by_memory = self.config.max_sequences.is_none();
                let started = opened.confined(settings);
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
                        let device = m.device().unwrap_or("the CPU");
                        format!("{layers}; {} sequences at once; on {device}", m.sequences())
                    }
                    Err(e) => format!("worker failed to start: {e}"),
                });
                audit("sandbox", rec)?;
                let m = Box::new(started.map_err(open_error)?);
                if is_embedder {
                    engine::Backend::Embed(m)
                } else {
                    engine::Backend::Text(m)
                }
            }
            None => {
                rec.detail = Some("inference runs in the server process, unconfined".into());
                audit("sandbox", rec)?;
                if is_embedder {
                    engine::Backend::EmbedInProcess(Box::new(
                        opened.embedder().map_err(open_error)?,
                    ))
                } else {
                    engine::Backend::TextInProcess(Box::new(
                        opened.text_model().map_err(open_error)?,
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
