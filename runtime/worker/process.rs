//! The worker process: `securerun __worker`. It takes its descriptors, confines itself before it
//! has a second thread or reads a model byte, then loads the model from the passed descriptors
//! and serves requests until the supervisor hangs up.

use std::collections::HashMap;
use std::fs::File;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use securerun_models::batch::OnText;
use securerun_models::{
    Batch, BatchLimits, ChatMessage, Embedder, Generation, LoadOptions, ModelSource, PrefixKey,
    TextModel,
};
use securerun_sandbox::{Channel, Confinement, Mode};

use super::protocol::{FailureCause, FromWorker, LayerMsg, Task, ToWorker, MAX_TO_WORKER};

/// Descriptors a worker may hold open (IPC, weight files, what candle and the allocator need).
const OPEN_FILES: u64 = 64;

fn send(channel: &mut Channel, msg: &FromWorker) -> bool {
    match serde_json::to_vec(msg) {
        Ok(bytes) => channel.send(&bytes).is_ok(),
        Err(_) => false,
    }
}

fn recv(channel: &mut Channel) -> Option<ToWorker> {
    let bytes = channel.recv(MAX_TO_WORKER, None).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn layer_msgs(report: &securerun_sandbox::Report) -> Vec<LayerMsg> {
    report
        .layers
        .iter()
        .map(|l| LayerMsg {
            name: l.name.to_string(),
            enforced: l.enforced,
            detail: l.detail.clone(),
        })
        .collect()
}

fn fail(channel: &mut Channel, id: Option<u64>, error: String) -> ExitCode {
    send(
        channel,
        &FromWorker::Failed {
            id,
            error,
            cause: FailureCause::General,
        },
    );
    ExitCode::FAILURE
}

/// Entry point of `securerun __worker MODE MEMORY_BYTES FD_COUNT`.
pub fn main(args: &[String]) -> ExitCode {
    let (mode, memory, fd_count) = match args {
        [mode, memory, fds] => (
            if mode == "permissive" {
                Mode::Permissive
            } else {
                Mode::Strict
            },
            memory.parse().unwrap_or(0),
            fds.parse().unwrap_or(0),
        ),
        _ => return ExitCode::from(2),
    };
    let Ok((mut channel, fds)) = securerun_sandbox::inherited(fd_count) else {
        return ExitCode::from(2);
    };
    let confinement = Confinement {
        mode,
        address_space: memory,
        open_files: OPEN_FILES,
        extra_syscalls: Vec::new(),
        grants: Vec::new(),
    };
    let report = match securerun_sandbox::confine(&confinement) {
        Ok(report) => report,
        Err(e) => return fail(&mut channel, None, e.to_string()),
    };
    let layers = layer_msgs(&report);
    if !send(&mut channel, &FromWorker::Confined { layers }) {
        return ExitCode::FAILURE;
    }
    // Confined: from here on every byte is parsed inside the sandbox.
    let Some(ToWorker::Load {
        task,
        source,
        limits,
        precision,
        max_sequences,
    }) = recv(&mut channel)
    else {
        return fail(&mut channel, None, "expected a load message".into());
    };
    let files: Vec<File> = fds.into_iter().map(File::from).collect();
    let source = match source
        .into_parts()
        .and_then(|parts| ModelSource::from_parts(parts, files, &limits).map_err(|e| e.to_string()))
    {
        Ok(s) => Arc::new(s),
        Err(e) => return fail(&mut channel, None, e),
    };
    let opts = LoadOptions {
        limits,
        precision,
        ..Default::default()
    };
    match task {
        Task::Generate => match TextModel::load(&source, &opts) {
            Ok(model) => serve_generate(&mut channel, model, max_sequences.clamp(1, 256)),
            Err(e) => fail(&mut channel, None, e.to_string()),
        },
        Task::Embed => match Embedder::load(&source, &opts) {
            Ok(model) => serve_embed(&mut channel, model),
            Err(e) => fail(&mut channel, None, e.to_string()),
        },
    }
}

fn serve_generate(channel: &mut Channel, model: TextModel, max_sequences: usize) -> ExitCode {
    if let Err(e) = super::start_threads_then_cap() {
        return fail(channel, None, e);
    }
    let limits = BatchLimits {
        max_sequences,
        max_step_tokens: max_sequences.max(STEP_TOKENS),
    };
    match Batch::new(&model, limits) {
        Ok(batch) => {
            if !send(
                channel,
                &FromWorker::Ready {
                    sequences: max_sequences,
                },
            ) {
                return ExitCode::FAILURE;
            }
            serve_batched(channel, &model, batch, limits)
        }
        // A reference architecture: one generation at a time.
        Err(_) => {
            if !send(channel, &FromWorker::Ready { sequences: 1 }) {
                return ExitCode::FAILURE;
            }
            serve_one_at_a_time(channel, model)
        }
    }
}

/// Prompt tokens a step may feed beside the running decodes: chunks long enough to keep the
/// matrix kernels busy, short enough that running generations wait at most one chunk.
const STEP_TOKENS: usize = 256;

/// Text pieces produced during a step, by request id, in order.
type Outbox = Arc<Mutex<Vec<(u64, String)>>>;

/// Continuous batching in the worker: generations join between steps, each step is one forward
/// pass over all of them, and a cancellation or a finished generation frees its slot at once.
/// Text pieces and completions are sent after every step; requests are read between steps.
fn serve_batched<'m>(
    channel: &mut Channel,
    model: &'m TextModel,
    mut batch: Batch<'m, 'static>,
    limits: BatchLimits,
) -> ExitCode {
    let outbox: Outbox = Arc::default();
    // Batch sequence id -> request id.
    let mut requests: HashMap<u64, u64> = HashMap::new();
    loop {
        // With nothing to compute, wait for a request; else take only what is already waiting.
        while batch.is_empty() || channel.readable() {
            let Some(msg) = recv(channel) else {
                return ExitCode::SUCCESS; // supervisor gone or closed the channel
            };
            let reply = match msg {
                ToWorker::Generate {
                    id,
                    prompt_ids,
                    params,
                    prefix_key,
                } => {
                    let sink = outbox.clone();
                    let on_text: OnText<'static> = Box::new(move |piece: &str| {
                        sink.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((id, piece.to_string()));
                        ControlFlow::Continue(())
                    });
                    match batch.add(&prompt_ids, &params, prefix_key.map(PrefixKey), on_text) {
                        Ok(seq) => {
                            requests.insert(seq, id);
                            None
                        }
                        Err(e) => Some(FromWorker::Failed {
                            id: Some(id),
                            error: e.to_string(),
                            cause: FailureCause::of(&e),
                        }),
                    }
                }
                ToWorker::Cancel { id } => {
                    // A request already finished is not in the batch any more: nothing to do.
                    let seq = requests.iter().find(|(_, &r)| r == id).map(|(&s, _)| s);
                    seq.and_then(|seq| {
                        requests.remove(&seq);
                        batch.cancel(seq).map(|g| done(id, g))
                    })
                }
                ToWorker::Render {
                    id,
                    messages,
                    tools,
                } => Some(rendered(model, id, &messages, &tools)),
                _ => return fail(channel, None, "unexpected message".into()),
            };
            if let Some(reply) = reply {
                if !send(channel, &reply) {
                    return ExitCode::SUCCESS;
                }
            }
        }
        let finished = match batch.step() {
            Ok(finished) => finished,
            Err(e) => {
                // The pass itself failed: every generation in it fails, the batch starts over.
                for (_, id) in requests.drain() {
                    let reply = FromWorker::Failed {
                        id: Some(id),
                        error: e.to_string(),
                        cause: FailureCause::of(&e),
                    };
                    if !send(channel, &reply) {
                        return ExitCode::SUCCESS;
                    }
                }
                outbox.lock().unwrap_or_else(|p| p.into_inner()).clear();
                match Batch::new(model, limits) {
                    Ok(b) => batch = b,
                    Err(e) => return fail(channel, None, e.to_string()),
                }
                continue;
            }
        };
        let pieces = std::mem::take(&mut *outbox.lock().unwrap_or_else(|p| p.into_inner()));
        for (id, text) in pieces {
            if !send(channel, &FromWorker::Text { id, text }) {
                return ExitCode::SUCCESS;
            }
        }
        for f in finished {
            let Some(id) = requests.remove(&f.id) else {
                continue;
            };
            if !send(channel, &ended(id, f.result)) {
                return ExitCode::SUCCESS;
            }
        }
    }
}

fn done(id: u64, g: Generation) -> FromWorker {
    FromWorker::Done {
        id,
        finish_reason: g.finish_reason,
        prompt_tokens: g.prompt_tokens,
        cached_tokens: g.cached_tokens,
        token_ids: g.token_ids,
        prefill_us: g.prefill_time.as_micros() as u64,
        decode_us: g.decode_time.as_micros() as u64,
        logprobs: g.logprobs,
    }
}

/// The end of generation `id`: its completion, or its failure.
fn ended(
    id: u64,
    result: Result<Generation, securerun_models::generate::GenerateError>,
) -> FromWorker {
    match result {
        Ok(g) => done(id, g),
        Err(e) => FromWorker::Failed {
            id: Some(id),
            error: e.to_string(),
            cause: FailureCause::of(&e),
        },
    }
}

fn rendered(
    model: &TextModel,
    id: u64,
    messages: &[ChatMessage],
    tools: &[serde_json::Value],
) -> FromWorker {
    match model.render_chat_with_tools(messages, tools) {
        Ok(text) => FromWorker::Rendered { id, text },
        Err(e) => FromWorker::Failed {
            id: Some(id),
            error: e.to_string(),
            cause: FailureCause::General,
        },
    }
}

/// One generation at a time (architectures that cannot batch).
fn serve_one_at_a_time(channel: &mut Channel, mut model: TextModel) -> ExitCode {
    loop {
        let Some(msg) = recv(channel) else {
            return ExitCode::SUCCESS; // supervisor gone or closed the channel
        };
        let (id, prompt_ids, params) = match msg {
            ToWorker::Generate {
                id,
                prompt_ids,
                params,
                ..
            } => (id, prompt_ids, params),
            ToWorker::Render {
                id,
                messages,
                tools,
            } => {
                if !send(channel, &rendered(&model, id, &messages, &tools)) {
                    return ExitCode::SUCCESS;
                }
                continue;
            }
            ToWorker::Cancel { .. } => continue, // for a request already finished
            _ => return fail(channel, None, "unexpected message".into()),
        };
        let mut lost = false;
        let result = {
            let mut on_text = |text: &str| {
                if !send(
                    channel,
                    &FromWorker::Text {
                        id,
                        text: text.to_string(),
                    },
                ) {
                    lost = true;
                    return ControlFlow::Break(());
                }
                if channel.readable() {
                    match recv(channel) {
                        Some(ToWorker::Cancel { id: c }) if c == id => {
                            return ControlFlow::Break(())
                        }
                        Some(ToWorker::Cancel { .. }) => {}
                        _ => {
                            lost = true;
                            return ControlFlow::Break(());
                        }
                    }
                }
                ControlFlow::Continue(())
            };
            model.generate_from_ids(&prompt_ids, &params, &mut on_text)
        };
        if lost {
            return ExitCode::SUCCESS;
        }
        if !send(channel, &ended(id, result)) {
            return ExitCode::SUCCESS;
        }
    }
}

fn serve_embed(channel: &mut Channel, model: Embedder) -> ExitCode {
    if let Err(e) = super::start_threads_then_cap() {
        return fail(channel, None, e);
    }
    if !send(channel, &FromWorker::Ready { sequences: 1 }) {
        return ExitCode::FAILURE;
    }
    loop {
        let Some(msg) = recv(channel) else {
            return ExitCode::SUCCESS;
        };
        let reply = match msg {
            ToWorker::Embed { id, inputs } => match model.embed_inputs(&inputs) {
                Ok(vectors) => FromWorker::Embeddings { id, vectors },
                Err(e) => FromWorker::Failed {
                    id: Some(id),
                    error: e.to_string(),
                    cause: FailureCause::General,
                },
            },
            ToWorker::Cancel { .. } => continue,
            _ => return fail(channel, None, "unexpected message".into()),
        };
        if !send(channel, &reply) {
            return ExitCode::SUCCESS;
        }
    }
}

/// Entry point of `securerun __probe NAME PARENT_PID`: confine strictly, then try the escape.
pub fn probe_main(args: &[String]) -> ExitCode {
    let [name, parent] = args else {
        return ExitCode::from(2);
    };
    let Ok((mut channel, _)) = securerun_sandbox::inherited(0) else {
        return ExitCode::from(2);
    };
    let report_only = name == "report";
    let confinement = Confinement {
        mode: if report_only {
            Mode::Permissive
        } else {
            Mode::Strict
        },
        address_space: 1 << 30,
        open_files: OPEN_FILES,
        extra_syscalls: Vec::new(),
        grants: Vec::new(),
    };
    let report = match securerun_sandbox::confine(&confinement) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(securerun_sandbox::probe::EXIT_SETUP as u8);
        }
    };
    if report_only {
        let layers = layer_msgs(&report);
        send(&mut channel, &FromWorker::Confined { layers });
        return ExitCode::SUCCESS;
    }
    securerun_sandbox::probe::run(name, parent.parse().unwrap_or(1))
}
