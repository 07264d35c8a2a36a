//! The models one server serves, by API name. Each has its own engine (and its own confined
//! worker, memory budget and queue); one listener, one token store and one audit log serve
//! them all, and a token names the models it may use.
//!
//! A model is replaced in place by a reload: the version on disk is verified and started
//! beside the running one, the switch is recorded, then requests go to the new one while the
//! old one finishes what it holds and stops (its worker ends when its last request does).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::engine::Engine;

/// Where a served model comes from: what a reload verifies and starts again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name clients use (`model` in requests, `/v1/models`, token model lists).
    pub name: String,
    /// Model directory or .safetensors file.
    pub path: PathBuf,
    /// Signature file (default: model.sig in a directory, FILE.sig beside a file).
    #[serde(default)]
    pub signature: Option<PathBuf>,
}

impl ModelSpec {
    /// Parses `NAME=PATH` (`--model`).
    pub fn parse_flag(flag: &str) -> Result<ModelSpec, String> {
        let (name, path) = flag
            .split_once('=')
            .ok_or_else(|| format!("--model {flag:?}: expected NAME=PATH"))?;
        let spec = ModelSpec {
            name: name.to_string(),
            path: PathBuf::from(path),
            signature: None,
        };
        spec.check_name()?;
        Ok(spec)
    }

    /// A model name is what clients send and what tokens list: short, printable, no spaces.
    pub fn check_name(&self) -> Result<(), String> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "model name {:?}: use 1 to 128 letters, digits and - _ . : /",
                self.name
            ))
        }
    }
}

/// A model being served.
pub struct ServedModel {
    pub spec: ModelSpec,
    pub engine: Engine,
    /// The model's tokenizer and chat template, here in the server: prompt lengths, budgets and
    /// usage are counted on this side, never taken from the worker.
    pub encoder: Arc<securerun_models::PromptEncoder>,
    /// Unix time it started serving.
    pub loaded_at: u64,
    /// 0 for the version the server started with, then one more per replacement.
    pub version: u64,
    /// Who signed the weights it serves (`None`: served unsigned, `--allow-unsigned`).
    pub signer: Option<String>,
}

impl ServedModel {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

impl Drop for ServedModel {
    /// The last request holding this version has ended: its engine finishes and stops (and
    /// with it the worker).
    fn drop(&mut self) {
        self.engine.close();
    }
}

/// The served models by name.
pub struct ModelSet {
    by_name: RwLock<BTreeMap<String, Arc<ServedModel>>>,
    /// One replacement at a time.
    pub(super) replacing: tokio::sync::Mutex<()>,
}

impl ModelSet {
    pub fn new(models: Vec<ServedModel>) -> Self {
        let by_name = models
            .into_iter()
            .map(|m| (m.spec.name.clone(), Arc::new(m)))
            .collect();
        ModelSet {
            by_name: RwLock::new(by_name),
            replacing: tokio::sync::Mutex::new(()),
        }
    }

    /// The version of `name` serving now; a request keeps the one it got to its end.
    pub fn get(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.by_name
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every model serving now, by name.
    pub fn all(&self) -> Vec<Arc<ServedModel>> {
        self.by_name
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Puts `model` in the place of the model of the same name; returns the one it replaced.
    pub(super) fn replace(&self, model: ServedModel) -> Option<Arc<ServedModel>> {
        self.by_name
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.spec.name.clone(), Arc::new(model))
    }
}

/// Verifies and starts a model (each step audited: `model_verification`, `sandbox_started`);
/// the server keeps one to start replacements. Blocking: run it off the async threads.
pub type Starter = Arc<dyn Fn(&ModelSpec, u64) -> Result<ServedModel, StartError> + Send + Sync>;

/// Why a model did not start (at `serve`, or as a replacement).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Opening, verifying or loading it failed, or its worker did not start.
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: crate::open::Error,
    },
    /// A step could not be recorded, so it was not taken.
    #[error("cannot record the {step}: {source}")]
    Audit {
        step: &'static str,
        source: crate::audit::AuditError,
    },
    #[error("the start panicked")]
    Panicked,
}

/// Why a model was not replaced; the running version keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("no model {0:?} is served here")]
    Unknown(String),
    /// The version on disk failed verification, or its worker did not start.
    #[error("the new version of {name} was refused: {source}")]
    Refused { name: String, source: StartError },
    #[error("the replacement of {0} could not be recorded in the audit log")]
    Audit(String),
    #[error("the server is stopping")]
    ShuttingDown,
}

/// Replaces model `name` by the version on disk now: verified and started beside the running
/// one, recorded (`model_replaced`, durable before any request reaches it), then switched to.
/// Requests already running finish on the old version, whose worker stops after them. `by`
/// says who asked (recorded).
pub async fn replace(
    state: &Arc<super::AppState>,
    name: &str,
    by: &str,
) -> Result<Arc<ServedModel>, ReplaceError> {
    let _one_at_a_time = state.models.replacing.lock().await;
    // After the shutdown's last record nothing may be recorded (it holds this lock from then).
    if state.shutting_down() {
        return Err(ReplaceError::ShuttingDown);
    }
    let old = state
        .models
        .get(name)
        .ok_or_else(|| ReplaceError::Unknown(name.to_string()))?;
    let (spec, version) = (old.spec.clone(), old.version + 1);
    drop(old);
    let starter = state.starter.clone();
    let started = tokio::task::spawn_blocking(move || starter(&spec, version))
        .await
        .unwrap_or(Err(StartError::Panicked));
    let mut record = crate::audit::AuditRecord::event("model_replaced");
    record.model = Some(name.to_string());
    let new = match started {
        Ok(new) => new,
        Err(source) => {
            record.outcome = Some("refused".into());
            record.detail = Some(format!("asked by {by}: {source}"));
            let _ = state.audit.append(record).await;
            tracing::error!(model = name, reason = %source, "model replacement refused");
            return Err(ReplaceError::Refused {
                name: name.to_string(),
                source,
            });
        }
    };
    record.outcome = Some("replaced".into());
    record.detail = Some(format!(
        "asked by {by}: version {version}, signer {}",
        new.signer.as_deref().unwrap_or("none (unsigned allowed)")
    ));
    // Record before acting: no request reaches the new version before this is durable.
    if state.audit.append(record).await.is_err() {
        return Err(ReplaceError::Audit(name.to_string()));
    }
    state.models.replace(new);
    tracing::info!(model = name, version, "model replaced");
    state
        .models
        .get(name)
        .ok_or_else(|| ReplaceError::Unknown(name.to_string()))
}

/// Replaces the models named (none: every model) one after the other; what happened to each.
pub async fn replace_named(
    state: &Arc<super::AppState>,
    names: &[String],
    by: &str,
) -> Vec<crate::reload::Outcome> {
    let names: Vec<String> = if names.is_empty() {
        state
            .models
            .all()
            .iter()
            .map(|m| m.name().to_string())
            .collect()
    } else {
        names.to_vec()
    };
    let mut outcomes = Vec::with_capacity(names.len());
    for name in names {
        let outcome = match replace(state, &name, by).await {
            Ok(new) => crate::reload::Outcome {
                model: name,
                replaced: true,
                detail: format!("version {}", new.version),
            },
            Err(e) => crate::reload::Outcome {
                model: name,
                replaced: false,
                detail: e.to_string(),
            },
        };
        outcomes.push(outcome);
    }
    outcomes
}
