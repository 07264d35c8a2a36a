//! The supervisor's side: start a confined worker for a verified model, send it requests,
//! treat everything it says as untrusted, and replace it when it dies.

use std::ffi::OsString;
use std::ops::ControlFlow;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use securerun_models::{Generation, GenerationParams, Limits, ModelSource, Prompt, PromptEncoder};
use securerun_sandbox::{Channel, FrameError, Mode, WorkerProcess, WorkerSpec};

use super::protocol::{FromWorker, LayerMsg, PartsMsg, Task, ToWorker, MAX_FROM_WORKER};
use crate::open::DeviceChoice;

mod streams;
pub use streams::Event;

/// Why a confined request failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the inference worker: {0}")]
    Spawn(String),
    #[error("the inference worker refused to start: {0}")]
    Refused(String),
    #[error("the inference worker {0}; it will be restarted for the next request")]
    Died(String),
    #[error("the inference worker broke the protocol ({0}); it was stopped and will be restarted")]
    Protocol(String),
    #[error(
        "the inference worker did not answer within {0:?}; it was stopped and will be restarted"
    )]
    Timeout(Duration),
    #[error("the model files changed on disk since they were verified ({0}); refusing to start a worker on them")]
    Reverification(String),
    #[error("{0}")]
    Request(String),
    /// The request's output grammar (response format, tools) cannot be used.
    #[error("{0}")]
    Grammar(String),
    /// The request's output grammar failed mid-generation.
    #[error("{0}")]
    GrammarStep(String),
    /// The model's configuration or tokenizer, read in the supervisor, is unusable.
    #[error("{0}")]
    Model(String),
}

impl WorkerError {
    /// The worker's report that a request failed, by its cause.
    pub fn request(error: String, cause: super::protocol::FailureCause) -> Self {
        match cause {
            super::protocol::FailureCause::General => WorkerError::Request(error),
            super::protocol::FailureCause::Grammar => WorkerError::Grammar(error),
            super::protocol::FailureCause::GrammarStep => WorkerError::GrammarStep(error),
        }
    }
}

/// How to run workers.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The `securerun` binary to re-execute (default: this executable).
    pub program: PathBuf,
    pub mode: Mode,
    /// Address-space budget; a worker that exceeds it fails its allocation and dies, the host
    /// is unaffected. `None`: derived from the verified weights ([`default_memory_budget`]).
    pub memory_budget: Option<u64>,
    /// Compute threads in the worker.
    pub threads: usize,
    /// Longest wait for the worker to load a model.
    pub load_timeout: Duration,
    /// Longest silence from the worker during a request (between two frames).
    pub frame_timeout: Duration,
    /// The most positions a request can use (prompt + generated), for the memory estimate;
    /// `None`: the model's own `max_position_embeddings`.
    pub context_limit: Option<u64>,
    /// The precision the worker loads the weights at (`--dtype`).
    pub precision: securerun_models::Precision,
    /// Generations the worker runs at once (continuous batching; each holds a KV cache).
    pub max_sequences: usize,
    /// `max_sequences` is a ceiling, lowered (to one at least) until every sequence's KV cache
    /// fits the memory budget; otherwise it is a requirement and a model that cannot hold that
    /// many is refused.
    pub sequences_by_memory: bool,
    /// Where the worker computes. A CUDA worker is confined with the GPU profile
    /// ([`securerun_sandbox::gpu`]) and refuses to start without a usable device: never a
    /// silent fall back to the CPU.
    pub device: crate::open::DeviceChoice,
}

impl WorkerSettings {
    /// Defaults; the memory budget follows the verified weights when the worker starts.
    pub fn new() -> std::io::Result<Self> {
        Ok(WorkerSettings {
            program: std::env::current_exe()?,
            mode: Mode::Strict,
            memory_budget: None,
            threads: std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            load_timeout: Duration::from_secs(600),
            frame_timeout: Duration::from_secs(300),
            context_limit: None,
            precision: securerun_models::Precision::Auto,
            max_sequences: 1,
            sequences_by_memory: false,
            device: crate::open::DeviceChoice::Cpu,
        })
    }
}

/// The default address-space budget for `weight_bytes` of verified weights: 4x the weights (f16
/// weights become f32 tensors, plus the mapping) plus 4 GiB for activations, KV cache and
/// allocator arenas, but never more than the machine's physical memory. It is computed from the
/// weights the signature covers (the files the worker receives), never from a directory
/// listing, so an unsigned sparse file beside the model cannot lift it.
pub fn default_memory_budget(weight_bytes: u64) -> u64 {
    let wanted = weight_bytes.saturating_mul(4).saturating_add(4 << 30);
    wanted.min(physical_memory().unwrap_or(u64::MAX))
}

fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf takes an integer name and returns a number.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| (pages as u64).saturating_mul(size as u64))
}

/// Refuses, here in the supervisor and before any worker exists, a model whose configuration
/// implies more memory than the worker's budget (weights at f32, rotary tables, KV cache at the
/// context limit, activations): a model file decides those sizes.
///
/// Returns how many sequences the worker may run at once (see
/// [`WorkerSettings::sequences_by_memory`]).
fn check_memory(
    source: &ModelSource,
    task: Task,
    settings: &WorkerSettings,
) -> Result<usize, WorkerError> {
    let budget = settings
        .memory_budget
        .unwrap_or_else(|| default_memory_budget(source.weight_bytes()));
    let precision = settings.precision.for_task(task.into());
    let est = securerun_models::budget::estimate(source, precision, settings.context_limit)
        .map_err(|e| WorkerError::Model(e.to_string()))?;
    // Every sequence of a batch holds its own KV cache.
    let with = |sequences: usize| {
        est.total().saturating_add(
            est.kv_cache
                .saturating_mul(sequences.saturating_sub(1) as u64),
        )
    };
    let mut sequences = settings.max_sequences.max(1);
    let needed = match task {
        Task::Generate => {
            if settings.sequences_by_memory {
                while sequences > 1 && with(sequences) > budget {
                    sequences -= 1;
                }
            }
            with(sequences)
        }
        // Encoders keep no KV cache and compute on short inputs.
        Task::Embed => est.weights.saturating_add(est.activations.min(1 << 30)),
    };
    if needed > budget {
        let mib = |b: u64| b >> 20;
        let fewer = if sequences > 1 {
            ", serve fewer sequences at once (max_sequences)"
        } else {
            ""
        };
        return Err(WorkerError::Model(format!(
            "the model needs about {} MiB (weights {} MiB at {precision} with the mapped files, KV cache {} MiB per sequence for {sequences}, rotary tables {} MiB, activations {} MiB), more than the worker's memory budget of {} MiB: pass --worker-memory with more{fewer}, or serve a shorter context",
            mib(needed),
            mib(est.weights),
            mib(est.kv_cache),
            mib(est.rotary),
            mib(est.activations),
            mib(budget)
        )));
    }
    Ok(sequences)
}

/// What the caller of one request knows that the worker does not: when the request must end
/// and whether its client is still there. The supervisor checks both while it waits.
pub struct RequestControl<'a> {
    /// The request's wall-clock deadline; past it, generation is cancelled.
    pub deadline: Option<Instant>,
    /// True once the client has gone (polled while waiting, even during prefill).
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl RequestControl<'_> {
    /// No deadline, never cancelled from outside.
    pub fn none() -> RequestControl<'static> {
        RequestControl {
            deadline: None,
            cancelled: &|| false,
        }
    }

    fn should_stop(&self) -> bool {
        (self.cancelled)() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// When a request's worker is given up on and killed: [`CANCEL_GRACE`] past the request's
/// deadline; with no deadline, [`CANCEL_GRACE`] after a cancellation. A client that merely goes
/// away does not get the worker killed (that would let any client force restarts, say during a
/// long prefill): the worker stops at its next token, and the deadline bounds the wait.
fn kill_after(deadline: Option<Instant>, cancel_sent: Option<Instant>) -> Instant {
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    match (deadline, cancel_sent) {
        (Some(d), _) => d + CANCEL_GRACE,
        (None, Some(c)) => c + CANCEL_GRACE,
        (None, None) => far,
    }
}

/// Once a frame starts to arrive, the rest must follow within this long (frames are at most a
/// few MiB over a local socket): a worker that sends half a frame cannot hold the supervisor.
const FRAME_COMPLETE: Duration = Duration::from_secs(5);

/// How often the supervisor looks up from a silent worker to check cancellation and deadlines.
const POLL: Duration = Duration::from_millis(50);
/// How long a worker gets to acknowledge a cancellation before it is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Checks a model source again before a worker is started on it (see
/// [`ConfinedModel::set_reverify`]).
pub type Reverify = Box<dyn FnMut(&ModelSource) -> Result<(), String> + Send>;

struct Live {
    process: WorkerProcess,
}

/// A model served by a confined worker process.
pub struct ConfinedModel {
    source: Arc<ModelSource>,
    /// The tokenizer and chat template, in the supervisor: prompt ids and counts are ours.
    encoder: Arc<PromptEncoder>,
    /// Run before every replacement worker: the bytes it computes with must still be the
    /// verified ones.
    reverify: Option<Reverify>,
    /// Whether a worker was started before (the first start follows verification directly).
    started_once: bool,
    task: Task,
    limits: Limits,
    settings: WorkerSettings,
    live: Option<Live>,
    layers: Vec<LayerMsg>,
    next_id: u64,
    /// Generations the current worker runs at once (what it reported, at most what it was
    /// asked for).
    sequences: usize,
    /// The accelerator the current worker computes on, as it described it (none: the CPU).
    device: Option<String>,
    /// Requests in flight in the current worker.
    streams: std::collections::HashMap<u64, streams::Stream>,
    /// When the worker last said something while requests were in flight.
    last_heard: Instant,
    /// Consecutive failed starts or deaths, for backoff.
    failures: u32,
    /// Worker replacements so far (deaths, protocol breaks, timeouts).
    pub restarts: u64,
    /// Of those, workers the seccomp filter killed (SIGSYS): sandbox violations.
    pub seccomp_kills: u64,
    /// Workers that could not be started (refused re-verification included).
    pub start_failures: u64,
    /// What readiness probes read from other threads.
    status: Arc<WorkerStatus>,
}

/// A confined model's worker as other threads (the readiness probe) see it: its process id
/// while one runs, and whether the last attempt to start one failed.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    pid: std::sync::atomic::AtomicU32,
    start_failed: std::sync::atomic::AtomicBool,
}

/// [`WorkerStatus::state`]: what a readiness probe reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// A worker process runs.
    Up,
    /// None runs now (stopped after a failure, or it just died: the engine notices a death
    /// within a second); the next request starts one.
    Starting,
    /// The last start failed (for instance the weights no longer verify): retried with backoff.
    Failed,
}

impl WorkerStatus {
    pub fn state(&self) -> WorkerState {
        use std::sync::atomic::Ordering::Relaxed;
        if self.start_failed.load(Relaxed) {
            return WorkerState::Failed;
        }
        match self.pid.load(Relaxed) {
            0 => WorkerState::Starting,
            pid if process_alive(pid) => WorkerState::Up,
            _ => WorkerState::Starting,
        }
    }

    fn set(&self, pid: Option<u32>, start_failed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.pid.store(pid.unwrap_or(0), Relaxed);
        self.start_failed.store(start_failed, Relaxed);
    }
}

/// Whether our child `pid` runs (a zombie, dead but not yet reaped, does not). The id cannot
/// be reused while the supervisor has not reaped it.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl ConfinedModel {
    /// Starts a worker for `source` (already verified by the caller) and waits until the model
    /// is loaded inside it.
    pub fn start(
        source: Arc<ModelSource>,
        task: Task,
        limits: Limits,
        settings: WorkerSettings,
    ) -> Result<Self, WorkerError> {
        let encoder =
            PromptEncoder::load(&source).map_err(|e| WorkerError::Model(e.to_string()))?;
        Self::start_with_encoder(source, Arc::new(encoder), task, limits, settings)
    }

    /// [`ConfinedModel::start`] with the model's tokenizer already loaded (from the same
    /// source).
    pub fn start_with_encoder(
        source: Arc<ModelSource>,
        encoder: Arc<PromptEncoder>,
        task: Task,
        limits: Limits,
        settings: WorkerSettings,
    ) -> Result<Self, WorkerError> {
        let mut settings = settings;
        settings.max_sequences = check_memory(&source, task, &settings)?;
        let mut model = ConfinedModel {
            encoder,
            reverify: None,
            started_once: false,
            source,
            task,
            limits,
            settings,
            live: None,
            layers: Vec::new(),
            next_id: 1,
            sequences: 1,
            device: None,
            streams: Default::default(),
            last_heard: Instant::now(),
            failures: 0,
            restarts: 0,
            seccomp_kills: 0,
            start_failures: 0,
            status: Default::default(),
        };
        model.ensure_worker()?;
        Ok(model)
    }

    /// The tokenizer and chat template: count and bound prompts before submitting them.
    pub fn encoder(&self) -> Arc<PromptEncoder> {
        self.encoder.clone()
    }

    /// Sets the check run before every replacement worker starts (re-verification of the
    /// signature over the files the worker will receive). If it fails, no worker starts.
    pub fn set_reverify(&mut self, check: Reverify) {
        self.reverify = Some(check);
    }

    /// The confinement layers the current worker reported.
    pub fn layers(&self) -> &[LayerMsg] {
        &self.layers
    }

    /// The accelerator the current worker computes on, as it described it (none: the CPU).
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// The worker's process id, while one runs.
    pub fn worker_pid(&self) -> Option<u32> {
        self.live.as_ref().map(|l| l.process.child.id())
    }

    /// The worker's state as other threads see it (readiness).
    pub fn status(&self) -> Arc<WorkerStatus> {
        self.status.clone()
    }

    /// Between requests: a worker that died while idle is noticed (how it died, recorded by
    /// the caller like any other death) and one replacement is started now rather than at the
    /// next request. Nothing else is retried while idle: a worker that cannot start (weights
    /// that no longer verify) is retried by requests, with backoff, not in a loop that would
    /// fill the audit log. `Err` says how the old one died.
    pub fn check_idle(&mut self) -> Result<(), WorkerError> {
        let died = match &mut self.live {
            Some(live) => matches!(live.process.child.try_wait(), Ok(Some(_))),
            None => false,
        };
        if !died {
            return Ok(());
        }
        let e = self.discard(WorkerError::Died("exited while idle".into()));
        // Its own failure, if any, is counted (`start_failures`) and recorded with this one.
        let _ = self.ensure_worker();
        Err(e)
    }

    fn ensure_worker(&mut self) -> Result<&mut Live, WorkerError> {
        if self.live.is_none() {
            if self.failures > 0 {
                // Backoff: 100 ms, 200 ms, ... up to 5 s between consecutive failures.
                let delay = 100u64 << self.failures.min(6);
                std::thread::sleep(Duration::from_millis(delay.min(5000)));
            }
            match self.spawn() {
                Ok(live) => {
                    self.status.set(Some(live.process.child.id()), false);
                    self.live = Some(live);
                }
                Err(e) => {
                    self.failures += 1;
                    self.start_failures += 1;
                    self.status.set(None, true);
                    return Err(e);
                }
            }
        }
        Ok(self.live.as_mut().expect("set above"))
    }

    fn spawn(&mut self) -> Result<Live, WorkerError> {
        if self.started_once {
            if let Some(check) = self.reverify.as_mut() {
                check(&self.source).map_err(WorkerError::Reverification)?;
            }
        }
        self.started_once = true;
        let (parts, files) = self
            .source
            .parts()
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        let fds: Vec<OwnedFd> = files.into_iter().map(OwnedFd::from).collect();
        let mode = match self.settings.mode {
            Mode::Strict => "strict",
            Mode::Permissive => "permissive",
        };
        let spec = WorkerSpec {
            program: self.settings.program.clone(),
            args: vec![
                "__worker".into(),
                mode.into(),
                self.settings
                    .memory_budget
                    .unwrap_or_else(|| default_memory_budget(self.source.weight_bytes()))
                    .to_string()
                    .into(),
                fds.len().to_string().into(),
                self.settings.device.to_string().into(),
            ],
            env: worker_env(self.settings.device, self.settings.threads),
            fds,
            stderr: Stdio::null(),
        };
        let mut process =
            securerun_sandbox::spawn(spec).map_err(|e| WorkerError::Spawn(e.to_string()))?;
        // A worker that stops reading cannot block the supervisor's sends for longer than it
        // may stay silent.
        process
            .channel
            .set_send_timeout(Some(self.settings.frame_timeout))
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        let started = Instant::now();
        let timeout = self.settings.load_timeout;
        let result = (|| {
            let layers = match read(&mut process.channel, timeout)? {
                FromWorker::Confined { layers } => layers,
                FromWorker::Failed { error, .. } => {
                    return Err(WorkerError::Refused(printable(&error, REFUSAL_CHARS)))
                }
                other => return Err(WorkerError::Protocol(format!("unexpected {other:?}"))),
            };
            let load = ToWorker::Load {
                task: self.task,
                source: PartsMsg::from_parts(&parts),
                limits: self.limits,
                precision: self.settings.precision,
                max_sequences: self.settings.max_sequences,
                sequences_by_memory: self.settings.sequences_by_memory,
                context: self.settings.context_limit,
            };
            write(&mut process.channel, &load)?;
            let left = timeout.saturating_sub(started.elapsed());
            match read(&mut process.channel, left)? {
                FromWorker::Ready { device, .. }
                    if device.is_some() != (self.settings.device != DeviceChoice::Cpu) =>
                {
                    Err(WorkerError::Protocol(
                        "its device is not the one it was started for".into(),
                    ))
                }
                FromWorker::Ready { sequences, device }
                    if (1..=self.settings.max_sequences.max(1)).contains(&sequences) =>
                {
                    Ok((
                        layers,
                        sequences,
                        device.map(|d| printable(&d, DEVICE_CHARS)),
                    ))
                }
                FromWorker::Ready { sequences, .. } => Err(WorkerError::Protocol(format!(
                    "{sequences} sequences at once, asked for at most {}",
                    self.settings.max_sequences
                ))),
                FromWorker::Failed { error, .. } => {
                    Err(WorkerError::Refused(printable(&error, REFUSAL_CHARS)))
                }
                other => Err(WorkerError::Protocol(format!(
                    "unexpected {}",
                    kind(&other)
                ))),
            }
        })();
        match result {
            Ok((layers, sequences, device)) => {
                self.layers = layers;
                self.sequences = sequences;
                self.device = device;
                Ok(Live { process })
            }
            Err(e) => {
                let (e, seccomp_kill) = explain_death(&mut process, e);
                self.seccomp_kills += u64::from(seccomp_kill);
                let _ = process.child.kill();
                let _ = process.child.wait();
                Err(e)
            }
        }
    }

    /// A request's outcome: a request error leaves the worker in place; any other error means
    /// the worker can no longer be trusted to be in sync, so it is replaced.
    fn settle<T>(&mut self, result: Result<T, WorkerError>) -> Result<T, WorkerError> {
        match result {
            Err(
                e @ (WorkerError::Request(_)
                | WorkerError::Grammar(_)
                | WorkerError::GrammarStep(_)),
            ) => Err(e),
            Err(e) => Err(self.discard(e)),
            Ok(v) => {
                self.failures = 0;
                Ok(v)
            }
        }
    }

    /// Stops the current worker after a failure; the next request starts a new one.
    fn discard(&mut self, e: WorkerError) -> WorkerError {
        self.status.set(None, false);
        let e = match self.live.take() {
            Some(mut live) => {
                let (e, seccomp_kill) = explain_death(&mut live.process, e);
                self.seccomp_kills += u64::from(seccomp_kill);
                let _ = live.process.child.kill();
                let _ = live.process.child.wait();
                e
            }
            None => e,
        };
        self.failures += 1;
        self.restarts += 1;
        e
    }

    /// Generates in the worker, streaming text to `on_text`; `ControlFlow::Break` cancels.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, WorkerError> {
        let ids = match prompt {
            Prompt::Text(_) => self.encoder.prompt_ids(prompt),
            Prompt::Chat(messages) => {
                let (to_render, plan) = self.encoder.chat_plan(messages.clone());
                let text = self.render_chat(&to_render)?;
                self.encoder.chat_ids(&plan, &text)
            }
        }
        .map_err(|e| WorkerError::Request(e.to_string()))?;
        self.generate_ids(&ids, params, &RequestControl::none(), on_text)
    }

    /// Renders chat messages with the model's template, in the worker: a template is code from
    /// the model file, so it runs under the worker's memory cap and sandbox. The supervisor
    /// then tokenizes the text itself ([`PromptEncoder::rendered_ids`]).
    pub fn render_chat(
        &mut self,
        messages: &[securerun_models::ChatMessage],
    ) -> Result<String, WorkerError> {
        self.render_chat_by(messages, &[], None)
    }

    /// [`Self::render_chat`] within a request deadline (then the worker is killed).
    pub fn render_chat_by(
        &mut self,
        messages: &[securerun_models::ChatMessage],
        tools: &[serde_json::Value],
        deadline: Option<Instant>,
    ) -> Result<String, WorkerError> {
        self.require_idle()?;
        let id = self.start_render(messages, tools, deadline)?;
        loop {
            if let Some(event) = self.next_events(POLL)?.into_iter().next() {
                return match event {
                    Event::Rendered { id: got, result } if got == id => result,
                    other => Err(self.stray(other)),
                };
            }
        }
    }

    /// The one-request-at-a-time calls cannot share the channel with requests in flight.
    fn require_idle(&self) -> Result<(), WorkerError> {
        if self.streams.is_empty() {
            Ok(())
        } else {
            Err(WorkerError::Request(
                "the worker is busy with requests in flight".into(),
            ))
        }
    }

    /// An event for a request the caller did not make: cannot happen with one request in
    /// flight, so the worker is out of step.
    fn stray(&mut self, event: Event) -> WorkerError {
        self.lose_streams(WorkerError::Protocol(format!("unexpected {event:?}")))
    }

    /// Generates from prompt ids the supervisor computed itself ([`Self::encoder`]).
    ///
    /// Everything the worker says is checked: every frame must arrive whole within the frame
    /// timeout (a worker that drips bytes cannot stretch it), text pieces must be non-empty and
    /// at most `max_tokens + 1` of them, and the final counts must agree with what the
    /// supervisor knows. The returned prompt count is the supervisor's own. Past `control`'s
    /// deadline or once its client is gone, the worker is told to cancel and gets
    /// [`CANCEL_GRACE`] to finish; a worker that does not is killed and replaced.
    pub fn generate_ids(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        control: &RequestControl<'_>,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, WorkerError> {
        self.require_idle()?;
        let id = self.start_generate(prompt_ids, params, None, control.deadline)?;
        loop {
            if control.should_stop() {
                self.cancel(id)?;
            }
            for event in self.next_events(POLL)? {
                match event {
                    Event::Text { id: got, text } if got == id => {
                        if on_text(&text).is_break() {
                            self.cancel(id)?;
                        }
                    }
                    Event::Generated { id: got, result } if got == id => return result,
                    other => return Err(self.stray(other)),
                }
            }
        }
    }

    /// Embeds `texts` in the worker.
    pub fn embed(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>, WorkerError> {
        let inputs: Vec<_> = texts
            .iter()
            .map(|t| securerun_models::EmbedInput::Text(t.clone()))
            .collect();
        self.embed_by(&inputs, None)
    }

    /// [`Self::embed`] within a request deadline: a worker that has not answered
    /// [`CANCEL_GRACE`] past it is killed and replaced (embeddings cannot be cancelled midway).
    pub fn embed_by(
        &mut self,
        inputs: &[securerun_models::EmbedInput],
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>, WorkerError> {
        self.require_idle()?;
        let id = self.next_id;
        self.next_id += 1;
        let timeout = self.settings.frame_timeout;
        let live = self.ensure_worker()?;
        let msg = ToWorker::Embed {
            id,
            inputs: inputs.to_vec(),
        };
        let result = round_trip(live, &msg, timeout, deadline).and_then(|reply| match reply {
            FromWorker::Embeddings { id: got, vectors } if got == id => {
                let dim = vectors.first().map_or(0, Vec::len);
                let sane = vectors.len() == inputs.len()
                    && vectors
                        .iter()
                        .all(|v| v.len() == dim && v.iter().all(|x| x.is_finite()));
                if !sane {
                    return Err(WorkerError::Protocol(
                        "embeddings do not match the request".into(),
                    ));
                }
                Ok(vectors)
            }
            other => Err(unexpected(other, id)),
        });
        self.settle(result)
    }
}

/// Sends a request that has exactly one reply and waits for it: at most `timeout`, and at most
/// until the worker is given up on past `deadline`; a reply that has started must be whole
/// within [`FRAME_COMPLETE`].
fn round_trip(
    live: &mut Live,
    msg: &ToWorker,
    timeout: Duration,
    deadline: Option<Instant>,
) -> Result<FromWorker, WorkerError> {
    write(&mut live.process.channel, msg)?;
    let started = Instant::now();
    let limit = (started + timeout).min(kill_after(deadline, None));
    if let Wait::TimedOut = wait_for_frame(&live.process.channel, limit, || false) {
        // Say how long it really waited (the deadline may have come before the timeout).
        let waited = Duration::from_millis(started.elapsed().as_millis() as u64);
        return Err(WorkerError::Timeout(waited));
    }
    let by = limit.min(Instant::now() + FRAME_COMPLETE);
    read_by(&mut live.process.channel, by, timeout)
}

/// A reply that is not the one expected for request `id`: the worker's own failure report for
/// it (a request error), or a protocol error.
fn unexpected(reply: FromWorker, id: u64) -> WorkerError {
    match reply {
        FromWorker::Failed {
            id: Some(got),
            error,
            cause,
        } if got == id => WorkerError::request(error, cause),
        other => WorkerError::Protocol(format!("unexpected {}", kind(&other))),
    }
}

impl Drop for ConfinedModel {
    fn drop(&mut self) {
        if let Some(mut live) = self.live.take() {
            let _ = live.process.child.kill();
            let _ = live.process.child.wait();
        }
    }
}

/// The worker's whole environment (it starts from an empty one): its thread count and, for a
/// GPU worker, where the operator keeps the CUDA libraries, which devices it may see, and no
/// kernel cache (the driver would write compiled kernels under the home directory; the
/// worker has no writable path).
pub(crate) fn worker_env(device: DeviceChoice, threads: usize) -> Vec<(OsString, OsString)> {
    let mut env = vec![(
        OsString::from("RAYON_NUM_THREADS"),
        OsString::from(threads.to_string()),
    )];
    if device != DeviceChoice::Cpu {
        for name in ["LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES"] {
            if let Some(value) = std::env::var_os(name) {
                env.push((name.into(), value));
            }
        }
        env.push(("CUDA_CACHE_DISABLE".into(), "1".into()));
    }
    env
}

/// The longest device description from a worker that is shown and recorded.
const DEVICE_CHARS: usize = 200;
/// The longest reason a worker gives for refusing to start that is shown and recorded.
const REFUSAL_CHARS: usize = 1000;

/// Untrusted text from a worker, made safe to show on a terminal and to record: only visible
/// characters are kept (printable ASCII, Latin-1's visible ones, and letters and digits of any
/// script but the blank Hangul fillers), so no control, formatting, bidirectional, tag,
/// combining or blank character can reorder, hide or smuggle text; at most `max` characters.
pub(crate) fn printable(text: &str, max: usize) -> String {
    let visible = |c: char| {
        matches!(c, ' '..='~' | '\u{a1}'..='\u{ac}' | '\u{ae}'..='\u{ff}')
            || (c.is_alphanumeric()
                && !matches!(c, '\u{115f}' | '\u{1160}' | '\u{3164}' | '\u{ffa0}'))
    };
    text.chars().filter(|&c| visible(c)).take(max).collect()
}

fn kind(msg: &FromWorker) -> &'static str {
    match msg {
        FromWorker::Confined { .. } => "confined message",
        FromWorker::Ready { .. } => "ready message",
        FromWorker::DeviceCheck { .. } => "device check",
        FromWorker::Failed { .. } => "failure for another request",
        FromWorker::Text { .. } => "text for another request",
        FromWorker::Done { .. } => "completion for another request",
        FromWorker::Embeddings { .. } => "embeddings for another request",
        FromWorker::Rendered { .. } => "a rendered prompt for another request",
    }
}

fn write(channel: &mut Channel, msg: &ToWorker) -> Result<(), WorkerError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| WorkerError::Spawn(e.to_string()))?;
    channel.send(&bytes).map_err(frame_error)
}

enum Wait {
    Ready,
    Stop,
    TimedOut,
}

/// Waits for the worker's next frame until `deadline`, looking up every [`POLL`] to ask
/// `stop` whether the request should be cancelled.
fn wait_for_frame(channel: &Channel, deadline: Instant, mut stop: impl FnMut() -> bool) -> Wait {
    loop {
        if stop() {
            return Wait::Stop;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Wait::TimedOut;
        }
        if channel.wait_readable(left.min(POLL)) {
            return Wait::Ready;
        }
    }
}

/// Reads one message that must arrive whole by `deadline`.
fn read_by(
    channel: &mut Channel,
    deadline: Instant,
    timeout: Duration,
) -> Result<FromWorker, WorkerError> {
    let bytes = channel
        .recv_by(MAX_FROM_WORKER, deadline)
        .map_err(|e| match e {
            FrameError::Timeout => WorkerError::Timeout(timeout),
            other => frame_error(other),
        })?;
    serde_json::from_slice(&bytes).map_err(|e| WorkerError::Protocol(format!("bad message: {e}")))
}

/// Reads one message; every malformed or oversized frame is a protocol error.
fn read(channel: &mut Channel, timeout: Duration) -> Result<FromWorker, WorkerError> {
    let bytes = channel
        .recv(MAX_FROM_WORKER, Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| match e {
            FrameError::Timeout => WorkerError::Timeout(timeout),
            other => frame_error(other),
        })?;
    serde_json::from_slice(&bytes).map_err(|e| WorkerError::Protocol(format!("bad message: {e}")))
}

fn frame_error(e: FrameError) -> WorkerError {
    match e {
        FrameError::Closed => WorkerError::Died("exited".into()),
        FrameError::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            WorkerError::Died("exited".into())
        }
        other => WorkerError::Protocol(other.to_string()),
    }
}

/// If the worker is gone, says how it died (signal, exit status) instead of "exited", and
/// whether the seccomp filter killed it (from the exit status, never from anything it said).
fn explain_death(process: &mut WorkerProcess, e: WorkerError) -> (WorkerError, bool) {
    let WorkerError::Died(_) = e else {
        return (e, false);
    };
    // Give the kernel a moment to reap a process whose socket just closed.
    for _ in 0..50 {
        if let Ok(Some(status)) = process.child.try_wait() {
            use std::os::unix::process::ExitStatusExt;
            let how = match (status.code(), status.signal()) {
                (_, Some(libc::SIGSYS)) => {
                    "was killed by the seccomp filter (forbidden system call)".into()
                }
                (_, Some(libc::SIGKILL)) => "was killed (SIGKILL)".into(),
                (_, Some(libc::SIGABRT)) => {
                    "aborted (out of memory budget, or an internal error)".into()
                }
                (_, Some(sig)) => format!("was killed by signal {sig}"),
                (Some(code), None) => format!("exited with status {code}"),
                (None, None) => "exited".into(),
            };
            return (
                WorkerError::Died(how),
                status.signal() == Some(libc::SIGSYS),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (e, false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn worker_text_is_shown_without_control_or_reordering_characters() {
        let shown = super::printable("cuda:0\n\u{1b}[2J\u{202e}evil\u{2028}x\u{200b}y", 12);
        assert_eq!(shown, "cuda:0[2Jevi");
        // Formatting, tag, combining, variation, blank and filler characters.
        let hidden =
            "a\u{600}\u{1d173}\u{13430}\u{e0041}\u{34f}\u{3164}\u{fe0f}\u{180b}\u{2800}\u{85}b";
        assert_eq!(super::printable(hidden, 100), "ab");
        assert_eq!(
            super::printable("NVIDIA H200 — Größe 日本", 100),
            "NVIDIA H200  Größe 日本"
        );
        assert_eq!(super::printable(&"é".repeat(500), 200).chars().count(), 200);
    }
}
