//! Continuous batching in the engine: up to `max_sequences` generations advance together, new
//! requests join between steps, and one that ends, is cancelled, runs past its deadline or
//! whose client stops reading leaves at once.
//!
//! The loop is the same for both places a model runs: in this process (the models crate's
//! [`securerun_models::Batch`], one forward pass per step) and in the confined worker (which
//! runs that batch itself; a step here is reading what the worker said). Text pieces go to
//! per-request outboxes that are flushed without waiting, so a slow reader holds back only its
//! own request.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use securerun_models::{ChatMessage, Generation, GenerationParams, PrefixKey};

use super::metrics::EngineMetrics;
use super::{drop_job, EngineError, Job, JobControl, JobQueue, WorkerEvents, PIECE_SEND_WAIT};
use crate::worker::supervisor::Event;
use crate::worker::ConfinedModel;

/// How long a step waits for the confined worker before the loop looks at the queue again
/// (new requests join within this long while the worker computes).
const WORKER_WAIT: Duration = Duration::from_millis(5);

/// Text a generation produced that its client has not taken yet (the engine hands it on
/// without waiting).
#[derive(Clone, Default)]
pub struct Outbox(Arc<Mutex<Pending>>);

#[derive(Default)]
struct Pending {
    pieces: VecDeque<String>,
    /// Pieces produced so far (for the latency metrics).
    produced: u64,
}

impl Outbox {
    /// A piece of the generation's text, in order.
    pub fn push(&self, piece: &str) {
        let mut pending = self.lock();
        pending.pieces.push_back(piece.to_string());
        pending.produced += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a step reports: the generations that ended, by id.
pub type Ended = Vec<(u64, Result<Generation, EngineError>)>;

/// The generation interface: generations advancing together, wherever the model runs. The
/// engine loop ([`run`]) drives it; this process's model and the confined worker implement it,
/// and so can a test's fake backend ([`super::Backend::Sequences`]).
pub trait Sequences {
    /// Whether another generation can join.
    fn has_room(&self) -> bool;
    /// Generations in flight.
    fn in_flight(&self) -> usize;
    /// Nothing in flight (generations or renders).
    fn is_idle(&self) -> bool;
    /// Starts a generation whose text goes to `outbox`, reusing prefixes cached under
    /// `prefix_key`. A [`EngineError::Worker`] means every request in flight is lost.
    fn add(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        prefix_key: Option<PrefixKey>,
        deadline: Instant,
        outbox: Outbox,
    ) -> Result<u64, EngineError>;
    /// Renders chat messages; the result goes to `done` now or in a later step.
    fn render(
        &mut self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        deadline: Instant,
        done: oneshot::Sender<Result<String, EngineError>>,
    ) -> Result<(), EngineError>;
    /// Stops generation `id`: what it generated if it ended now, `None` if it ends in a later
    /// step (the confined worker acknowledges a cancellation).
    fn cancel(&mut self, id: u64) -> Result<Option<Generation>, EngineError>;
    /// Advances: the generations that ended. An error means every request in flight is lost.
    fn step(&mut self) -> Result<Ended, EngineError>;
    /// Worker replacements, seccomp kills and failed worker starts so far.
    fn restarts(&self) -> WorkerEvents;
    /// Called about every second while nothing is in flight: a worker that died idle is
    /// replaced now; `Some` says how it died or why none starts (recorded by the engine).
    fn check_idle(&mut self) -> Option<String> {
        None
    }
}

/// A model in this process, batched by the models crate.
pub(super) struct InProcess<'m> {
    pub model: &'m securerun_models::TextModel,
    pub batch: securerun_models::Batch<'m, 'static>,
    pub limits: securerun_models::BatchLimits,
}

impl Sequences for InProcess<'_> {
    fn has_room(&self) -> bool {
        self.batch.has_room()
    }

    fn in_flight(&self) -> usize {
        self.batch.len()
    }

    fn is_idle(&self) -> bool {
        self.batch.is_empty()
    }

    fn add(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        prefix_key: Option<PrefixKey>,
        _deadline: Instant,
        outbox: Outbox,
    ) -> Result<u64, EngineError> {
        let on_text: securerun_models::batch::OnText<'static> = Box::new(move |piece: &str| {
            outbox.push(piece);
            ControlFlow::Continue(())
        });
        self.batch
            .add(prompt_ids, params, prefix_key, on_text)
            .map_err(EngineError::from)
    }

    fn render(
        &mut self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        _deadline: Instant,
        done: oneshot::Sender<Result<String, EngineError>>,
    ) -> Result<(), EngineError> {
        let _ = done.send(
            self.model
                .render_chat_with_tools(messages, tools)
                .map_err(|e| EngineError::Request(e.to_string())),
        );
        Ok(())
    }

    fn cancel(&mut self, id: u64) -> Result<Option<Generation>, EngineError> {
        Ok(self.batch.cancel(id))
    }

    fn step(&mut self) -> Result<Ended, EngineError> {
        match self.batch.step() {
            Ok(finished) => Ok(finished
                .into_iter()
                .map(|f| {
                    let result = f.result.map_err(EngineError::from);
                    (f.id, result)
                })
                .collect()),
            Err(e) => {
                // The pass itself failed: every generation in it fails, the batch restarts.
                self.batch = securerun_models::Batch::new(self.model, self.limits)
                    .map_err(|e| EngineError::Request(e.to_string()))?;
                Err(EngineError::Request(e.to_string()))
            }
        }
    }

    fn restarts(&self) -> WorkerEvents {
        WorkerEvents::default()
    }
}

/// A model in the confined worker, which batches the generations itself; the supervisor
/// checks every frame against the request it names.
pub(super) struct Confined<'m> {
    pub model: &'m mut ConfinedModel,
    pub max_sequences: usize,
    pub outboxes: HashMap<u64, Outbox>,
    pub renders: HashMap<u64, oneshot::Sender<Result<String, EngineError>>>,
}

impl Confined<'_> {
    /// The worker was lost with everything in flight: the renders waiting fail here, the
    /// generations in the loop.
    fn lost(&mut self, e: crate::worker::WorkerError) -> EngineError {
        let e = EngineError::from(e);
        for (_, done) in self.renders.drain() {
            let _ = done.send(Err(e.clone()));
        }
        self.outboxes.clear();
        e
    }
}

impl Sequences for Confined<'_> {
    fn has_room(&self) -> bool {
        self.model.generations_in_flight() < self.model.sequences().min(self.max_sequences)
    }

    fn in_flight(&self) -> usize {
        self.model.generations_in_flight()
    }

    fn is_idle(&self) -> bool {
        self.model.is_idle()
    }

    fn add(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        prefix_key: Option<PrefixKey>,
        deadline: Instant,
        outbox: Outbox,
    ) -> Result<u64, EngineError> {
        let id = self
            .model
            .start_generate(prompt_ids, params, prefix_key, Some(deadline))
            .map_err(|e| self.lost(e))?;
        self.outboxes.insert(id, outbox);
        Ok(id)
    }

    fn render(
        &mut self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        deadline: Instant,
        done: oneshot::Sender<Result<String, EngineError>>,
    ) -> Result<(), EngineError> {
        match self.model.start_render(messages, tools, Some(deadline)) {
            Ok(id) => {
                self.renders.insert(id, done);
                Ok(())
            }
            Err(e) => {
                let e = self.lost(e);
                let _ = done.send(Err(e.clone()));
                Err(e)
            }
        }
    }

    fn cancel(&mut self, id: u64) -> Result<Option<Generation>, EngineError> {
        self.model.cancel(id).map_err(|e| self.lost(e))?;
        Ok(None)
    }

    fn step(&mut self) -> Result<Ended, EngineError> {
        let events = self
            .model
            .next_events(WORKER_WAIT)
            .map_err(|e| self.lost(e))?;
        let mut ended = Vec::new();
        for event in events {
            match event {
                Event::Text { id, text } => {
                    if let Some(outbox) = self.outboxes.get(&id) {
                        outbox.push(&text);
                    }
                }
                Event::Generated { id, result } => {
                    self.outboxes.remove(&id);
                    ended.push((id, result.map_err(EngineError::from)));
                }
                Event::Rendered { id, result } => {
                    if let Some(done) = self.renders.remove(&id) {
                        let _ = done.send(result.map_err(EngineError::from));
                    }
                }
            }
        }
        Ok(ended)
    }

    fn restarts(&self) -> WorkerEvents {
        WorkerEvents::of(self.model)
    }

    fn check_idle(&mut self) -> Option<String> {
        self.model.check_idle().err().map(|e| e.to_string())
    }
}

/// Prefix-cache keys from token ids: a keyed hash (random per engine), so the worker learns
/// which requests share a token, never which token. A job without an owner reuses nothing.
struct PrefixKeys(std::hash::RandomState);

impl PrefixKeys {
    fn new() -> Self {
        PrefixKeys(std::hash::RandomState::new())
    }

    fn of(&self, owner: &str) -> Option<PrefixKey> {
        use std::hash::BuildHasher;
        (!owner.is_empty()).then(|| PrefixKey(self.0.hash_one(owner)))
    }
}

/// A generation in the batch, with what its handler waits on.
struct InFlight {
    control: JobControl,
    pieces: mpsc::Sender<String>,
    done: oneshot::Sender<Result<Generation, EngineError>>,
    outbox: Outbox,
    /// Pieces seen produced, and when the last one was.
    seen: u64,
    last_piece: Option<Instant>,
    /// Since when the client's channel has been full with text still waiting.
    blocked_since: Option<Instant>,
    /// A cancellation was asked for; the end is on its way.
    cancelling: bool,
}

impl InFlight {
    /// Hands waiting pieces to the client without waiting; false when the client is gone or
    /// has taken nothing for [`PIECE_SEND_WAIT`] while text waited (the single-stream engine's
    /// bound on a consumer that stops taking pieces). A client that reads, however slowly,
    /// keeps its sequence: what waits for it is bounded by its own `max_tokens` (at most
    /// `max_tokens + 1` pieces, checked by the supervisor for a confined worker), never by
    /// anyone else's.
    fn flush(&mut self) -> bool {
        let mut pending = self.outbox.lock();
        let outbox = &mut pending.pieces;
        let mut moved = false;
        while let Some(piece) = outbox.pop_front() {
            match self.pieces.try_send(piece) {
                Ok(()) => moved = true,
                Err(mpsc::error::TrySendError::Full(piece)) => {
                    outbox.push_front(piece);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        if outbox.is_empty() || moved {
            self.blocked_since = None;
        } else if self.blocked_since.is_none() {
            self.blocked_since = Some(Instant::now());
        }
        let stalled = self
            .blocked_since
            .is_some_and(|t| t.elapsed() > PIECE_SEND_WAIT);
        !stalled
    }

    fn is_drained(&self) -> bool {
        self.outbox.lock().pieces.is_empty()
    }

    /// Observes the latency of the pieces produced since the last look: the first one's time
    /// since the job was created, then the time between pieces.
    fn observe(&mut self, metrics: &EngineMetrics) {
        let produced = self.outbox.lock().produced;
        if produced == self.seen {
            return;
        }
        let now = Instant::now();
        match self.last_piece {
            None => metrics
                .time_to_first_token
                .observe((now - self.control.created).as_secs_f64()),
            Some(last) => metrics
                .inter_token_latency
                .observe((now - last).as_secs_f64() / (produced - self.seen) as f64),
        }
        self.seen = produced;
        self.last_piece = Some(now);
    }
}

/// A finished generation whose last pieces the client has not taken yet.
struct Draining {
    flight: InFlight,
    result: Result<Generation, EngineError>,
    since: Instant,
}

/// What the loop reports about the worker after a failure (audit and metrics).
pub(super) type OnWorkerFailure<'a> = dyn FnMut(WorkerEvents, WorkerEvents, String) + 'a;

/// The engine loop over `sequences`; returns once the queue is closed and everything in
/// flight has ended.
pub(super) fn run(
    sequences: &mut dyn Sequences,
    queue: &JobQueue,
    metrics: &crate::server::Metrics,
    engine: &EngineMetrics,
    on_worker_failure: &mut OnWorkerFailure<'_>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut flights: HashMap<u64, InFlight> = HashMap::new();
    let prefix_keys = PrefixKeys::new();
    let mut draining: Vec<Draining> = Vec::new();
    loop {
        let before = sequences.restarts();
        let mut lost: Option<EngineError> = None;
        // Take jobs: wait when there is nothing to do, else only what is already waiting.
        while lost.is_none() {
            let idle = sequences.is_idle() && draining.is_empty();
            let job = if idle {
                let checked = queue.next_checking(|| {
                    let before = sequences.restarts();
                    if let Some(failure) = sequences.check_idle() {
                        on_worker_failure(before, sequences.restarts(), failure);
                    }
                });
                match checked {
                    Some(job) => Some(job),
                    None => return, // closed, and nothing left in flight
                }
            } else if sequences.has_room() {
                queue.try_next_fair(|owner| {
                    flights
                        .values()
                        .filter(|f| &*f.control.owner == owner)
                        .count()
                })
            } else {
                queue.try_next_not_generate()
            };
            let Some(job) = job else { break };
            if job.control().should_stop() {
                metrics.jobs_dropped.fetch_add(1, Relaxed);
                drop_job(job);
                continue;
            }
            match job {
                Job::Generate {
                    prompt_ids,
                    params,
                    control,
                    pieces,
                    done,
                } => {
                    let outbox = Outbox::default();
                    let key = prefix_keys.of(&control.owner);
                    match sequences.add(&prompt_ids, &params, key, control.deadline, outbox.clone())
                    {
                        Ok(id) => {
                            engine
                                .prompt_tokens
                                .fetch_add(prompt_ids.len() as u64, Relaxed);
                            let flight = InFlight {
                                control,
                                pieces,
                                done,
                                outbox,
                                seen: 0,
                                last_piece: None,
                                blocked_since: None,
                                cancelling: false,
                            };
                            flights.insert(id, flight);
                        }
                        Err(e @ EngineError::Worker(_)) => {
                            let _ = done.send(Err(e.clone()));
                            lost = Some(e);
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    }
                }
                Job::Render {
                    messages,
                    tools,
                    control,
                    done,
                } => {
                    if let Err(e @ EngineError::Worker(_)) =
                        sequences.render(&messages, &tools, control.deadline, done)
                    {
                        lost = Some(e);
                    }
                }
                Job::Embed { done, .. } => {
                    let _ = done.send(Err(EngineError::Request(
                        "this model does not compute embeddings".into(),
                    )));
                }
                other => drop_job(other),
            }
        }
        // Those that must stop leave before the step.
        if lost.is_none() {
            let stopping: Vec<u64> = flights
                .iter_mut()
                .filter(|(_, f)| !f.cancelling)
                .filter_map(|(&id, f)| (f.control.should_stop() || !f.flush()).then_some(id))
                .collect();
            for id in stopping {
                match sequences.cancel(id) {
                    Ok(Some(g)) => {
                        if let Some(flight) = flights.remove(&id) {
                            let _ = flight.done.send(Ok(g));
                        }
                    }
                    Ok(None) => {
                        if let Some(f) = flights.get_mut(&id) {
                            f.cancelling = true;
                        }
                    }
                    Err(e) => {
                        lost = Some(e);
                        break;
                    }
                }
            }
        }
        if lost.is_none() && !sequences.is_idle() {
            let active = sequences.in_flight() as u64;
            metrics.batch_sequences_peak.fetch_max(active, Relaxed);
            engine.sequences_active.store(active, Relaxed);
            if active > 0 {
                engine.batch_size.observe(active as f64);
            }
            match sequences.step() {
                Ok(ended) => {
                    for (id, result) in ended {
                        if let Some(mut flight) = flights.remove(&id) {
                            flight.observe(engine);
                            if let Ok(g) = &result {
                                engine
                                    .generated_tokens
                                    .fetch_add(g.completion_tokens() as u64, Relaxed);
                                engine
                                    .cached_prompt_tokens
                                    .fetch_add(g.cached_tokens as u64, Relaxed);
                            }
                            draining.push(Draining {
                                flight,
                                result,
                                since: Instant::now(),
                            });
                        }
                    }
                }
                Err(e) => lost = Some(e),
            }
            for f in flights.values_mut() {
                f.observe(engine);
                f.flush();
            }
        }
        if let Some(e) = lost {
            // Every generation in flight failed with the step (or with the worker).
            for (_, f) in flights.drain() {
                let _ = f.done.send(Err(e.clone()));
            }
            if let EngineError::Worker(failure) = e {
                on_worker_failure(before, sequences.restarts(), failure);
            }
        }
        // Finished generations reply once their client has every piece (or stopped taking them).
        let mut still = Vec::with_capacity(draining.len());
        for mut d in draining.drain(..) {
            let gone = !d.flight.flush();
            if d.flight.is_drained() {
                let _ = d.flight.done.send(d.result);
            } else if gone || d.since.elapsed() > PIECE_SEND_WAIT {
                if let Ok(g) = &mut d.result {
                    g.finish_reason = securerun_models::FinishReason::Cancelled;
                }
                let _ = d.flight.done.send(d.result);
            } else {
                still.push(d);
            }
        }
        draining = still;
        engine
            .sequences_active
            .store(sequences.in_flight() as u64, Relaxed);
        if sequences.is_idle() && !draining.is_empty() {
            // Only slow readers left: give them a moment instead of spinning.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
