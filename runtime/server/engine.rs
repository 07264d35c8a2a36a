//! The model behind the server: one OS thread owns the (confined or in-process) model and runs
//! jobs one at a time; handlers talk to it through channels. Streaming pieces flow back over a
//! bounded channel; a client that goes away closes it, which cancels the generation.

use std::ops::ControlFlow;
use std::sync::mpsc as std_mpsc;

use tokio::sync::{mpsc, oneshot};

use securerun_models::{Generation, GenerationParams, Prompt};

use crate::worker::ConfinedModel;

/// What the engine can run.
pub enum Backend {
    Text(Box<ConfinedModel>),
    Embed(Box<ConfinedModel>),
    TextInProcess(Box<securerun_models::TextModel>),
    EmbedInProcess(Box<securerun_models::Embedder>),
}

impl Backend {
    pub fn is_text(&self) -> bool {
        matches!(self, Backend::Text(_) | Backend::TextInProcess(_))
    }

    /// Worker replacements and, of those, seccomp kills so far.
    fn restarts(&self) -> (u64, u64) {
        match self {
            Backend::Text(m) | Backend::Embed(m) => (m.restarts, m.seccomp_kills),
            _ => (0, 0),
        }
    }
}

pub enum Job {
    Generate {
        prompt: Prompt,
        params: GenerationParams,
        /// Text pieces as they are generated; dropped receiver = cancel.
        pieces: mpsc::Sender<String>,
        done: oneshot::Sender<Result<Generation, String>>,
    },
    Embed {
        texts: Vec<String>,
        done: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
    },
}

/// The engine cannot take another job now.
#[derive(Debug)]
pub struct Busy;

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    jobs: std_mpsc::SyncSender<Job>,
    pub is_text: bool,
}

impl Engine {
    /// Starts the engine thread; at most `queue` jobs wait behind the running one.
    /// Worker replacements are audited (`worker_restarted`, with how the worker died).
    pub fn start(
        mut backend: Backend,
        queue: usize,
        audit: crate::audit::AuditLog,
        metrics: std::sync::Arc<super::Metrics>,
    ) -> Engine {
        let is_text = backend.is_text();
        let (tx, rx) = std_mpsc::sync_channel::<Job>(queue);
        std::thread::Builder::new()
            .name("securerun-engine".into())
            .spawn(move || {
                for job in rx {
                    let before = backend.restarts();
                    if let Some(failure) = run(&mut backend, job) {
                        let after = backend.restarts();
                        if after.0 > before.0 {
                            use std::sync::atomic::Ordering::Relaxed;
                            tracing::warn!(error = %failure, "inference worker replaced");
                            metrics.worker_restarts.fetch_add(1, Relaxed);
                            // A seccomp kill means the worker tried something the sandbox
                            // forbids: recorded as a violation, not just a crash.
                            if after.1 > before.1 {
                                metrics.sandbox_violations.fetch_add(1, Relaxed);
                                let mut v = crate::audit::AuditRecord::event("sandbox_violation")
                                    .with_detail(failure.clone());
                                v.outcome = Some("worker_killed".into());
                                let _ = audit.append_blocking(v);
                            }
                            let r = crate::audit::AuditRecord::event("worker_restarted")
                                .with_detail(failure);
                            let _ = audit.append_blocking(r);
                        }
                    }
                }
            })
            .expect("spawn engine thread");
        Engine { jobs: tx, is_text }
    }

    /// Queues a job; `Err` when the queue is full or the engine is gone (the caller answers
    /// 503). The refused job is dropped, which closes its channels.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        self.jobs.try_send(job).map_err(|_| Busy)
    }
}

/// Runs one job; returns the error message if it failed.
fn run(backend: &mut Backend, job: Job) -> Option<String> {
    match job {
        Job::Generate {
            prompt,
            params,
            pieces,
            done,
        } => {
            let mut on_text = |piece: &str| {
                // blocking_send waits while the client is slow; a closed channel (client gone)
                // cancels the generation.
                if pieces.blocking_send(piece.to_string()).is_err() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            let result = match backend {
                Backend::Text(m) => m
                    .generate(&prompt, &params, &mut on_text)
                    .map_err(|e| e.to_string()),
                Backend::TextInProcess(m) => m
                    .generate(&prompt, &params, &mut on_text)
                    .map_err(|e| e.to_string()),
                _ => Err("this model does not generate text".into()),
            };
            let failure = result.as_ref().err().cloned();
            let _ = done.send(result);
            failure
        }
        Job::Embed { texts, done } => {
            let result = match backend {
                Backend::Embed(m) => m.embed(&texts).map_err(|e| e.to_string()),
                Backend::EmbedInProcess(m) => m.embed(&texts).map_err(|e| e.to_string()),
                _ => Err("this model does not compute embeddings".into()),
            };
            let failure = result.as_ref().err().cloned();
            let _ = done.send(result);
            failure
        }
    }
}
