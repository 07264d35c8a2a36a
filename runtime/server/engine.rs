//! The model behind the server: one OS thread owns the (confined or in-process) model and runs
//! jobs one at a time; handlers talk to it through channels.
//!
//! The engine never waits on a client. Each job carries its deadline and a cancellation flag
//! that its handler raises when the client goes: a job whose client has gone, or whose deadline
//! has passed, is dropped before it touches the model; a running one stops at its next text
//! piece (and, in a confined worker, while the supervisor waits for the worker, prefill
//! included). Text pieces go back over a bounded channel with a bounded wait
//! ([`PIECE_SEND_WAIT`]): a consumer that stops taking them cancels the generation.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use securerun_models::{Generation, GenerationParams};

use crate::worker::supervisor::RequestControl;
use crate::worker::{ConfinedModel, WorkerError};

mod batched;
pub mod metrics;

pub use batched::{Ended, Outbox, Sequences};

/// What the engine can run.
pub enum Backend {
    Text(Box<ConfinedModel>),
    Embed(Box<ConfinedModel>),
    TextInProcess(Box<securerun_models::TextModel>),
    EmbedInProcess(Box<securerun_models::Embedder>),
    /// Any other implementation of the generation interface: the server's tests run the real
    /// router, handlers and engine loop over a fake one.
    Sequences(Box<dyn Sequences + Send>),
}

impl Backend {
    pub fn is_text(&self) -> bool {
        matches!(
            self,
            Backend::Text(_) | Backend::TextInProcess(_) | Backend::Sequences(_)
        )
    }

    /// See [`Sequences::check_idle`]: the embedding worker's idle check (generation backends
    /// are checked by their batch loop).
    fn check_idle(&mut self) -> Option<String> {
        match self {
            Backend::Text(m) | Backend::Embed(m) => m.check_idle().err().map(|e| e.to_string()),
            _ => None,
        }
    }

    /// The confined worker's state for readiness (`None`: in process).
    fn worker_status(&self) -> Option<Arc<crate::worker::WorkerStatus>> {
        match self {
            Backend::Text(m) | Backend::Embed(m) => Some(m.status()),
            _ => None,
        }
    }

    /// Worker replacements, seccomp kills and failed worker starts so far.
    fn restarts(&self) -> WorkerEvents {
        match self {
            Backend::Text(m) | Backend::Embed(m) => WorkerEvents::of(m),
            Backend::Sequences(s) => s.restarts(),
            _ => WorkerEvents::default(),
        }
    }
}

/// Counts of what happened to a model's workers, compared before and after a failure.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerEvents {
    restarts: u64,
    seccomp_kills: u64,
    start_failures: u64,
}

impl WorkerEvents {
    fn of(m: &ConfinedModel) -> Self {
        WorkerEvents {
            restarts: m.restarts,
            seccomp_kills: m.seccomp_kills,
            start_failures: m.start_failures,
        }
    }
}

/// Records what a worker failure led to: a worker that could not start, or one that was
/// replaced (and whether the seccomp filter killed it: a sandbox violation, not a crash).
fn record_worker_failure(
    model: &str,
    before: WorkerEvents,
    after: WorkerEvents,
    failure: String,
    audit: &crate::audit::AuditLog,
    metrics: &super::Metrics,
) {
    use std::sync::atomic::Ordering::Relaxed;
    if after.start_failures > before.start_failures {
        // No worker could start (e.g. the weights changed on disk since they were verified):
        // recorded, and retried with backoff.
        tracing::error!(error = %failure, "inference worker could not start");
        let mut r =
            crate::audit::AuditRecord::event("worker_start_failed").with_detail(failure.clone());
        r.outcome = Some("refused".into());
        let _ = audit.append_blocking(r);
    }
    if after.restarts > before.restarts {
        tracing::warn!(error = %failure, "inference worker replaced");
        metrics.worker_restarts.fetch_add(1, Relaxed);
        if after.seccomp_kills > before.seccomp_kills {
            metrics.sandbox_violations.fetch_add(1, Relaxed);
            let mut v =
                crate::audit::AuditRecord::event("sandbox_violation").with_detail(failure.clone());
            v.model = Some(model.to_string());
            v.outcome = Some("worker_killed".into());
            let _ = audit.append_blocking(v);
        }
        let mut r = crate::audit::AuditRecord::event("worker_restarted").with_detail(failure);
        r.model = Some(model.to_string());
        let _ = audit.append_blocking(r);
    }
}

/// A job's deadline and cancellation flag, shared with the handler that submitted it.
#[derive(Clone)]
pub struct JobControl {
    cancelled: Arc<AtomicBool>,
    pub deadline: Instant,
    /// When the job was made (its latency metrics count from here).
    pub created: Instant,
    /// Whose job it is (the token id): free slots go to the owner with the fewest generations
    /// running, so one token's burst cannot take every slot from the others.
    pub owner: Arc<str>,
}

impl JobControl {
    pub fn new(deadline: Instant) -> Self {
        JobControl {
            cancelled: Arc::default(),
            deadline,
            created: Instant::now(),
            owner: Arc::from(""),
        }
    }

    /// The job belongs to `owner` (a token id), for fair scheduling.
    pub fn owned_by(mut self, owner: &str) -> Self {
        self.owner = Arc::from(owner);
        self
    }

    /// Stops the job (its client went away, or its authorization ended).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn should_stop(&self) -> bool {
        self.is_cancelled() || Instant::now() >= self.deadline
    }

    /// A guard that cancels the job when dropped (a handler future dropped because its client
    /// went away).
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

pub struct CancelOnDrop(JobControl);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Why a job failed, typed until the HTTP edge.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request itself is at fault (prompt too long, bad template input...).
    #[error("{0}")]
    Request(String),
    /// The request's output grammar (response format, tools) cannot be used.
    #[error("{0}")]
    Grammar(String),
    /// The output grammar failed mid-generation (the engine's limit: a server error).
    #[error("{0}")]
    GrammarStep(String),
    /// The worker failed; it has been (or will be) replaced.
    #[error("{0}")]
    Worker(String),
    /// The job was dropped before it ran (client gone or deadline passed).
    #[error("the request was dropped before it ran")]
    Dropped,
}

impl From<WorkerError> for EngineError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Request(m) => EngineError::Request(m),
            WorkerError::Grammar(m) => EngineError::Grammar(m),
            WorkerError::GrammarStep(m) => EngineError::GrammarStep(m),
            other => EngineError::Worker(other.to_string()),
        }
    }
}

impl From<securerun_models::GenerateError> for EngineError {
    fn from(e: securerun_models::GenerateError) -> Self {
        match e {
            securerun_models::GenerateError::Grammar(
                g @ securerun_models::grammar::GrammarError::Step(_),
            ) => EngineError::GrammarStep(g.to_string()),
            securerun_models::GenerateError::Grammar(g) => EngineError::Grammar(g.to_string()),
            other => EngineError::Request(other.to_string()),
        }
    }
}

pub enum Job {
    Generate {
        prompt_ids: Vec<u32>,
        params: GenerationParams,
        control: JobControl,
        /// Text pieces as they are generated; a closed or stalled receiver cancels.
        pieces: mpsc::Sender<String>,
        done: oneshot::Sender<Result<Generation, EngineError>>,
    },
    Embed {
        /// Texts, or token ids a client sent.
        inputs: Vec<securerun_models::EmbedInput>,
        /// Their tokens, as the server counted them (for the joint call's token budget).
        tokens: usize,
        control: JobControl,
        done: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
    },
    /// Embedding jobs that were waiting together, run as one call (built by the engine, never
    /// submitted): every weight read serves all their texts.
    EmbedBatch(Vec<Job>),
    /// Render chat messages with the model's template (in the worker when confined).
    Render {
        messages: Vec<securerun_models::ChatMessage>,
        /// The tools the model may call (OpenAI's function objects), for the template.
        tools: Vec<serde_json::Value>,
        control: JobControl,
        done: oneshot::Sender<Result<String, EngineError>>,
    },
}

impl Job {
    /// The job's control (an embedding batch's first job's: the batch is built only from jobs
    /// that can still run, and each keeps its own for the reply).
    fn control(&self) -> &JobControl {
        match self {
            Job::Generate { control, .. }
            | Job::Embed { control, .. }
            | Job::Render { control, .. } => control,
            Job::EmbedBatch(jobs) => jobs[0].control(),
        }
    }

    /// Texts and tokens of an embedding job (none for other jobs).
    fn embed_size(&self) -> (usize, usize) {
        match self {
            Job::Embed { inputs, tokens, .. } => (inputs.len(), *tokens),
            _ => (0, 0),
        }
    }
}

/// Most texts the engine puts in one embedding call when it joins waiting requests: a batch
/// large enough to read each weight once for many sentences, small enough that the call's
/// latency stays that of a few requests.
pub const EMBED_BATCH_TEXTS: usize = 64;
/// Most tokens in one joint embedding call: the encoder packs the real tokens of every text
/// into one matrix (no padding), so the call's cost follows its tokens, and a few long texts
/// must not hold many short ones back behind a huge call.
pub const EMBED_BATCH_TOKENS: usize = 8192;

/// The engine cannot take another job now.
#[derive(Debug)]
pub struct Busy;

/// Longest the engine waits for room in a job's piece channel before it gives up on the
/// consumer and cancels the generation.
pub const PIECE_SEND_WAIT: Duration = Duration::from_secs(2);

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    queue: Arc<JobQueue>,
    pub is_text: bool,
    /// This engine's numbers for `/metrics` (labelled with its model's name).
    pub metrics: Arc<metrics::EngineMetrics>,
    /// Its confined worker's state (`None`: the model runs in the server process).
    pub worker: Option<Arc<crate::worker::WorkerStatus>>,
}

impl Engine {
    /// Starts the engine thread; at most `queue` jobs wait behind the running one.
    /// Worker replacements are audited (`worker_restarted`, with how the worker died).
    /// `runtime` is the server's Tokio runtime (bounded waits on piece channels use its timer).
    pub fn start(
        model: String,
        mut backend: Backend,
        queue: usize,
        max_sequences: usize,
        audit: crate::audit::AuditLog,
        metrics: std::sync::Arc<super::Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Engine {
        let is_text = backend.is_text();
        let worker = backend.worker_status();
        let jobs = Arc::new(JobQueue {
            jobs: Mutex::default(),
            ready: Condvar::new(),
            capacity: queue,
            closed: AtomicBool::new(false),
        });
        let rx = jobs.clone();
        let engine_metrics = Arc::new(metrics::EngineMetrics::default());
        let em = engine_metrics.clone();
        std::thread::Builder::new()
            .name("securerun-engine".into())
            .spawn(move || {
                use std::sync::atomic::Ordering::Relaxed;
                let mut on_failure = |before, after, failure| {
                    record_worker_failure(&model, before, after, failure, &audit, &metrics)
                };
                match &mut backend {
                    Backend::TextInProcess(model) => {
                        let limits = securerun_models::BatchLimits {
                            max_sequences,
                            max_step_tokens: max_sequences.max(256),
                        };
                        // Fails only when the model cannot batch (a reference architecture):
                        // then jobs run one at a time below.
                        match securerun_models::Batch::new(model, limits) {
                            Ok(batch) => {
                                let mut seqs = batched::InProcess {
                                    model,
                                    batch,
                                    limits,
                                };
                                batched::run(&mut seqs, &rx, &metrics, &em, &mut on_failure)
                            }
                            Err(e) => {
                                tracing::info!(reason = %e, "generation runs one request at a time")
                            }
                        }
                    }
                    Backend::Sequences(seqs) => {
                        batched::run(seqs.as_mut(), &rx, &metrics, &em, &mut on_failure)
                    }
                    Backend::Text(model) => {
                        let mut seqs = batched::Confined {
                            model,
                            max_sequences,
                            outboxes: Default::default(),
                            renders: Default::default(),
                        };
                        batched::run(&mut seqs, &rx, &metrics, &em, &mut on_failure)
                    }
                    _ => {}
                }
                loop {
                    let Some(job) = rx.next_checking(|| {
                        let before = backend.restarts();
                        if let Some(failure) = backend.check_idle() {
                            on_failure(before, backend.restarts(), failure);
                        }
                    }) else {
                        return; // closed: the backend (and its worker) goes with this thread
                    };
                    if job.control().should_stop() {
                        // Its client has gone or its time is up: it never touches the model.
                        metrics.jobs_dropped.fetch_add(1, Relaxed);
                        drop_job(job);
                        continue;
                    }
                    let before = backend.restarts();
                    let job = match job {
                        Job::Embed { .. } => match rx.more_embeddings(&job) {
                            more if more.is_empty() => job,
                            more => {
                                metrics.embed_batches.fetch_add(1, Relaxed);
                                Job::EmbedBatch(std::iter::once(job).chain(more).collect())
                            }
                        },
                        other => other,
                    };
                    if let Some(failure) = run(&mut backend, job, &runtime) {
                        record_worker_failure(
                            &model,
                            before,
                            backend.restarts(),
                            failure,
                            &audit,
                            &metrics,
                        );
                    }
                }
            })
            .expect("spawn engine thread");
        Engine {
            queue: jobs,
            is_text,
            metrics: engine_metrics,
            worker,
        }
    }

    /// Queues a job; `Err` when the queue is full or the engine is gone (the caller answers
    /// 503). The refused job is dropped, which closes its channels.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        self.queue.push(job)
    }

    /// Jobs waiting now.
    pub fn queue_depth(&self) -> usize {
        self.queue
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// No more jobs: the engine runs what it holds, then its thread ends and the model (and
    /// its worker) is dropped.
    pub fn close(&self) {
        let _jobs = self.queue.jobs.lock().unwrap_or_else(|p| p.into_inner());
        self.queue.closed.store(true, Ordering::Relaxed);
        self.queue.ready.notify_all();
    }
}

/// The jobs waiting for the engine. Jobs whose client has gone (or whose deadline passed) give
/// their place up when the queue is full, so clients that submit and vanish cannot keep the
/// queue full for everyone else.
struct JobQueue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    capacity: usize,
    /// No more jobs will come (the model was replaced and its last handle dropped): the
    /// engine finishes what it holds and stops.
    closed: AtomicBool,
}

impl JobQueue {
    fn push(&self, job: Job) -> Result<(), Busy> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Relaxed) {
            return Err(Busy);
        }
        if jobs.len() >= self.capacity {
            let (dead, live): (VecDeque<Job>, VecDeque<Job>) =
                jobs.drain(..).partition(|j| j.control().should_stop());
            *jobs = live;
            dead.into_iter().for_each(drop_job);
        }
        if jobs.len() >= self.capacity {
            return Err(Busy);
        }
        jobs.push_back(job);
        self.ready.notify_one();
        Ok(())
    }

    /// Waiting embedding jobs that can join `first` in one call, in arrival order, up to
    /// [`EMBED_BATCH_TEXTS`] texts in all; dead ones (client gone, deadline passed) are dropped
    /// on the way. Jobs of other kinds keep their places.
    fn more_embeddings(&self, first: &Job) -> Vec<Job> {
        let (texts, tokens) = first.embed_size();
        let mut room = EMBED_BATCH_TEXTS.saturating_sub(texts);
        let mut token_room = EMBED_BATCH_TOKENS.saturating_sub(tokens);
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            let (n, t) = job.embed_size();
            if n == 0 || n > room || t > token_room {
                kept.push_back(job);
            } else if job.control().should_stop() {
                drop_job(job);
            } else {
                room -= n;
                token_room -= t;
                taken.push(job);
            }
        }
        *jobs = kept;
        taken
    }

    /// The next job for a free slot, if any: a job that is not a generation first (renders
    /// and the like are quick and come before their own generation), else the generation whose
    /// owner has the fewest running (`running(owner)`), the earliest among equals.
    fn try_next_fair(&self, running: impl Fn(&str) -> usize) -> Option<Job> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(jobs.front()?, Job::Generate { .. }) {
            return jobs.pop_front();
        }
        let i = jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| matches!(j, Job::Generate { .. }))
            .min_by_key(|(i, j)| (running(&j.control().owner), *i))
            .map(|(i, _)| i)?;
        jobs.remove(i)
    }

    /// The first waiting job that is not a generation (a full batch still serves them).
    fn try_next_not_generate(&self) -> Option<Job> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let i = jobs
            .iter()
            .position(|j| !matches!(j, Job::Generate { .. }))?;
        jobs.remove(i)
    }

    /// The next job, waiting for one and checking the backend's worker every [`IDLE_CHECK`]
    /// meanwhile (`check`); `None` once the queue is closed and empty.
    fn next_checking(&self, mut check: impl FnMut()) -> Option<Job> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(job) = jobs.pop_front() {
                return Some(job);
            }
            if self.closed.load(Ordering::Relaxed) {
                return None;
            }
            let (held, waited) = self
                .ready
                .wait_timeout(jobs, IDLE_CHECK)
                .unwrap_or_else(|p| p.into_inner());
            jobs = held;
            if waited.timed_out() && jobs.is_empty() {
                // Not under the lock: the check may take a while (a worker start).
                drop(jobs);
                check();
                jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// How often an idle engine looks at its worker: one that died between requests is replaced
/// (and recorded) within this, so readiness reflects a worker that can serve.
const IDLE_CHECK: Duration = Duration::from_secs(1);

fn drop_job(job: Job) {
    match job {
        Job::Generate { done, .. } => {
            let _ = done.send(Err(EngineError::Dropped));
        }
        Job::Embed { done, .. } => {
            let _ = done.send(Err(EngineError::Dropped));
        }
        Job::Render { done, .. } => {
            let _ = done.send(Err(EngineError::Dropped));
        }
        Job::EmbedBatch(jobs) => jobs.into_iter().for_each(drop_job),
    }
}

/// Sends a piece, waiting at most [`PIECE_SEND_WAIT`] for room; false when the consumer is
/// gone or stalled.
fn send_piece(
    pieces: &mpsc::Sender<String>,
    piece: &str,
    runtime: &tokio::runtime::Handle,
) -> bool {
    match pieces.try_send(piece.to_string()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(piece)) => runtime
            .block_on(pieces.send_timeout(piece, PIECE_SEND_WAIT))
            .is_ok(),
    }
}

/// Hands a job's result to its handler; returns the worker failure, if the worker failed.
fn reply<T>(
    done: oneshot::Sender<Result<T, EngineError>>,
    result: Result<T, EngineError>,
) -> Option<String> {
    let failure = match &result {
        Err(EngineError::Worker(m)) => Some(m.clone()),
        _ => None,
    };
    let _ = done.send(result);
    failure
}

/// Runs one job; returns the worker failure message if the worker failed.
fn run(backend: &mut Backend, job: Job, runtime: &tokio::runtime::Handle) -> Option<String> {
    match job {
        Job::Generate {
            prompt_ids,
            params,
            control,
            pieces,
            done,
        } => {
            let mut on_text = |piece: &str| {
                if control.should_stop() || !send_piece(&pieces, piece, runtime) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            let result = match backend {
                Backend::Text(m) => {
                    let stop = || control.should_stop() || pieces.is_closed();
                    let rc = RequestControl {
                        deadline: Some(control.deadline),
                        cancelled: &stop,
                    };
                    m.generate_ids(&prompt_ids, &params, &rc, &mut on_text)
                        .map_err(EngineError::from)
                }
                Backend::TextInProcess(m) => m
                    .generate_from_ids(&prompt_ids, &params, &mut on_text)
                    .map_err(EngineError::from),
                _ => Err(EngineError::Request(
                    "this model does not generate text".into(),
                )),
            };
            reply(done, result)
        }
        Job::Render {
            messages,
            tools,
            control,
            done,
        } => {
            let result = match backend {
                Backend::Text(m) => m
                    .render_chat_by(&messages, &tools, Some(control.deadline))
                    .map_err(EngineError::from),
                Backend::TextInProcess(m) => m
                    .render_chat_with_tools(&messages, &tools)
                    .map_err(|e| EngineError::Request(e.to_string())),
                _ => Err(EngineError::Request(
                    "this model does not generate text".into(),
                )),
            };
            reply(done, result)
        }
        Job::EmbedBatch(jobs) => run_embed_batch(backend, jobs, runtime),
        Job::Embed {
            inputs,
            control,
            done,
            ..
        } => {
            let result = match backend {
                Backend::Embed(m) => m
                    .embed_by(&inputs, Some(control.deadline))
                    .map_err(EngineError::from),
                Backend::EmbedInProcess(m) => m
                    .embed_inputs(&inputs)
                    .map_err(|e| EngineError::Request(e.to_string())),
                _ => Err(EngineError::Request(
                    "this model does not compute embeddings".into(),
                )),
            };
            reply(done, result)
        }
    }
}

/// Runs waiting embedding jobs as one call and hands each its own vectors. The call's deadline
/// is the earliest job's (each job's handler also stops waiting at its own). If the joint call
/// fails for the request's sake (one input the model refuses), each job runs alone so that
/// the error reaches only the job it belongs to.
fn run_embed_batch(
    backend: &mut Backend,
    jobs: Vec<Job>,
    runtime: &tokio::runtime::Handle,
) -> Option<String> {
    let mut texts = Vec::new();
    let mut deadline: Option<Instant> = None;
    for job in &jobs {
        if let Job::Embed {
            inputs: t, control, ..
        } = job
        {
            texts.extend(t.iter().cloned());
            deadline = Some(deadline.map_or(control.deadline, |d| d.min(control.deadline)));
        }
    }
    let result = match backend {
        Backend::Embed(m) => m.embed_by(&texts, deadline).map_err(EngineError::from),
        Backend::EmbedInProcess(m) => m
            .embed_inputs(&texts)
            .map_err(|e| EngineError::Request(e.to_string())),
        _ => Err(EngineError::Request(
            "this model does not compute embeddings".into(),
        )),
    };
    match result {
        Ok(vectors) if vectors.len() == texts.len() => {
            let mut vectors = vectors.into_iter();
            for job in jobs {
                if let Job::Embed { inputs, done, .. } = job {
                    let mine: Vec<Vec<f32>> = vectors.by_ref().take(inputs.len()).collect();
                    let _ = done.send(Ok(mine));
                }
            }
            None
        }
        Err(EngineError::Worker(m)) => {
            // The worker failed (and is being replaced): every job of the call failed with it.
            for job in jobs {
                if let Job::Embed { done, .. } = job {
                    let _ = done.send(Err(EngineError::Worker(m.clone())));
                }
            }
            Some(m)
        }
        _ => {
            let mut failure = None;
            for job in jobs {
                if let Some(f) = run(backend, job, runtime) {
                    failure = Some(f);
                }
            }
            failure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embed_job(texts: usize, tokens: usize) -> Job {
        Job::Embed {
            inputs: vec![securerun_models::EmbedInput::Text("x".into()); texts],
            tokens,
            control: JobControl::new(Instant::now() + Duration::from_secs(60)),
            done: oneshot::channel().0,
        }
    }

    fn queue(jobs: Vec<Job>) -> JobQueue {
        JobQueue {
            jobs: Mutex::new(jobs.into()),
            ready: Condvar::new(),
            capacity: 64,
            closed: AtomicBool::new(false),
        }
    }

    fn generation(owner: &str, first_token: u32) -> Job {
        Job::Generate {
            prompt_ids: vec![first_token],
            params: Default::default(),
            control: JobControl::new(Instant::now() + Duration::from_secs(60)).owned_by(owner),
            pieces: mpsc::channel(1).0,
            done: oneshot::channel().0,
        }
    }

    fn first_id(job: &Job) -> (String, u32) {
        match job {
            Job::Generate {
                prompt_ids,
                control,
                ..
            } => (control.owner.to_string(), prompt_ids[0]),
            _ => panic!("not a generation"),
        }
    }

    /// A free slot goes to the token with the fewest generations running, the earliest of its
    /// jobs first: a burst from one token waits behind another token's single request.
    #[test]
    fn free_slots_go_to_the_token_with_the_fewest_running() {
        let q = queue(vec![
            generation("a", 1),
            generation("a", 2),
            generation("a", 3),
            generation("b", 4),
        ]);
        let running = |a: usize, b: usize| move |owner: &str| if owner == "a" { a } else { b };
        let next = |a, b| first_id(&q.try_next_fair(running(a, b)).unwrap());
        assert_eq!(next(1, 0), ("b".to_string(), 4));
        assert_eq!(next(1, 1), ("a".to_string(), 1));
        assert_eq!(next(2, 1), ("a".to_string(), 2));
        assert_eq!(q.jobs.lock().unwrap().len(), 1);
    }

    /// Waiting embedding requests join up to the text and the token budget, in arrival order;
    /// one that does not fit keeps its place for the next call.
    #[test]
    fn embedding_joins_stop_at_the_text_and_token_budgets() {
        let q = queue(vec![
            embed_job(8, 4100),
            embed_job(8, 4100),
            embed_job(1, 10),
            embed_job(60, 60),
        ]);
        let first = embed_job(1, 100);
        let taken: Vec<(usize, usize)> = q
            .more_embeddings(&first)
            .iter()
            .map(Job::embed_size)
            .collect();
        // 100 + 4100 + 10 fits; another 4100 would pass 8192 tokens; 60 texts would pass 64.
        assert_eq!(taken, [(8, 4100), (1, 10)]);
        let left: Vec<(usize, usize)> =
            q.jobs.lock().unwrap().iter().map(Job::embed_size).collect();
        assert_eq!(left, [(8, 4100), (60, 60)]);
    }
}
