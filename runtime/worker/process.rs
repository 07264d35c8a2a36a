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
    Batch, BatchLimits, ChatMessage, Device, Embedder, Generation, LoadOptions, ModelSource,
    Precision, PrefixKey, TextModel,
};
use securerun_sandbox::{Channel, Confinement, MemoryLimit, Mode};

use crate::open::DeviceChoice;

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

/// Entry point of `securerun __worker MODE MEMORY_BYTES FD_COUNT DEVICE`.
pub fn main(args: &[String]) -> ExitCode {
    let (mode, memory, fd_count, device) = match args {
        [mode, memory, fds, device] => (
            if mode == "permissive" {
                Mode::Permissive
            } else {
                Mode::Strict
            },
            memory.parse().unwrap_or(0),
            fds.parse().unwrap_or(0),
            device.parse::<DeviceChoice>(),
        ),
        _ => return ExitCode::from(2),
    };
    let Ok((mut channel, fds)) = securerun_sandbox::inherited(fd_count) else {
        return ExitCode::from(2);
    };
    let Ok(device) = device else {
        return fail(&mut channel, None, "unknown device".into());
    };
    // A GPU worker opens the CUDA libraries while it can still read them (no thread starts).
    if let DeviceChoice::Cuda(_) = device {
        if let Err(e) = securerun_models::cuda::load_libraries() {
            return fail(&mut channel, None, e.to_string());
        }
    }
    // A GPU worker is given the one GPU it asked for (which CUDA then knows as device 0).
    let (confinement, cuda_ordinal) = match confinement(device, mode, memory) {
        Ok(c) => c,
        Err(e) => return fail(&mut channel, None, e),
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
        sequences_by_memory,
        context,
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
    let max_sequences = max_sequences.clamp(1, 256);
    let sequences = Sequences {
        max: match task {
            Task::Generate => max_sequences,
            Task::Embed => 1,
        },
        by_memory: sequences_by_memory,
    };
    let (device, described, max_sequences) = match device {
        DeviceChoice::Cpu => (Device::Cpu, None, max_sequences),
        DeviceChoice::Cuda(n) => {
            match open_gpu(n, cuda_ordinal, &source, precision, context, sequences) {
                Ok((device, info, fit)) => (device, Some(info), fit),
                Err(e) => return fail(&mut channel, None, e),
            }
        }
    };
    let opts = LoadOptions {
        limits,
        precision,
        device,
        ..Default::default()
    };
    match task {
        Task::Generate => match TextModel::load(&source, &opts) {
            Ok(model) => serve_generate(&mut channel, model, max_sequences, described),
            Err(e) => fail(&mut channel, None, e.to_string()),
        },
        Task::Embed => match Embedder::load(&source, &opts) {
            Ok(model) => serve_embed(&mut channel, model, described),
            Err(e) => fail(&mut channel, None, e.to_string()),
        },
    }
}

/// Descriptors a GPU worker may hold open: the CPU worker's, plus the driver's (a control
/// node, one per device, the unified-memory node, event descriptors).
const GPU_OPEN_FILES: u64 = 256;

/// The worker's confinement: every layer, plus for a GPU the NVIDIA profile
/// ([`securerun_sandbox::gpu`]) for the GPU `cuda:N` names, and the ordinal CUDA will know
/// that GPU by.
fn confinement(
    device: DeviceChoice,
    mode: Mode,
    memory: u64,
) -> Result<(Confinement, usize), String> {
    match device {
        DeviceChoice::Cpu => Ok((
            Confinement {
                mode,
                memory: MemoryLimit::AddressSpace(memory),
                open_files: OPEN_FILES,
                extra_syscalls: Vec::new(),
                extra_arg_rules: &[],
                grants: Vec::new(),
                leave_root: false,
            },
            0,
        )),
        DeviceChoice::Cuda(n) => {
            let (profile, ordinal) = gpu_profile(n)?;
            Ok((profile.confinement(mode, memory, GPU_OPEN_FILES), ordinal))
        }
    }
}

/// The GPU profile for the GPU CUDA would number `ordinal`, resolved from the driver's list
/// while the worker can still read it, and from then on the only GPU CUDA sees in this
/// process (`CUDA_VISIBLE_DEVICES` set to its UUID: it is device 0). A host whose driver
/// lists no GPU gets a profile with no GPU node; CUDA then reports the absence itself.
fn gpu_profile(ordinal: usize) -> Result<(securerun_sandbox::gpu::GpuProfile, usize), String> {
    use securerun_sandbox::gpu;
    let root = std::path::Path::new("/");
    let Some(gpus) = gpu::nvidia_gpus(root).map_err(|e| e.to_string())? else {
        return Ok((gpu::nvidia(None), ordinal));
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let selected =
        gpu::select(root, &gpus, ordinal, visible.as_deref()).map_err(|e| e.to_string())?;
    // The worker has one thread here: nothing reads the environment concurrently.
    std::env::set_var("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    std::env::set_var("CUDA_VISIBLE_DEVICES", &selected.gpu.uuid);
    Ok((gpu::nvidia(Some(&selected)), 0))
}

/// How many generations a worker may run at once.
#[derive(Debug, Clone, Copy)]
struct Sequences {
    max: usize,
    /// `max` may be lowered to what memory holds (else it is required).
    by_memory: bool,
}

/// Initialises the GPU asked for as `cuda:requested`, which CUDA knows as `ordinal` in this
/// process (confined: the driver's threads inherit every layer), and refuses a model whose
/// weights, rotary tables, activations and one full-context KV cache per sequence it will
/// batch, all at the dtype they will have on the device, exceed the memory the device reports
/// free. Returns the device, how it is described, and how many sequences it holds (`max`, or
/// fewer when `by_memory`).
fn open_gpu(
    requested: usize,
    ordinal: usize,
    source: &ModelSource,
    precision: Precision,
    context: Option<u64>,
    sequences: Sequences,
) -> Result<(Device, String, usize), String> {
    let (device, mut info) =
        securerun_models::cuda::open_device(ordinal).map_err(|e| e.to_string())?;
    info.ordinal = requested;
    let (est, held) = match precision {
        Precision::Q8_0 | Precision::Q4_0 | Precision::Q4K => (
            securerun_models::budget::estimate_quantized_on_device(source, precision, context),
            precision.to_string(),
        ),
        _ => {
            let dtype = precision
                .candle_dtype()
                .unwrap_or_else(|| securerun_models::load::accelerator_dtype(source));
            (
                securerun_models::budget::estimate_on_device(source, dtype, context),
                format!("{dtype:?}").to_lowercase(),
            )
        }
    };
    let est = est.map_err(|e| e.to_string())?;
    let n = securerun_models::cuda::sequences_that_fit(
        &est,
        &held,
        &info,
        sequences.max,
        sequences.by_memory,
    )
    .map_err(|e| e.to_string())?;
    Ok((device, describe(&info), n))
}

/// How a device is shown and recorded.
pub(crate) fn describe(info: &securerun_models::cuda::DeviceInfo) -> String {
    format!(
        "cuda:{} ({}, compute capability {}.{}, {} MiB free of {} MiB)",
        info.ordinal,
        info.name,
        info.capability.0,
        info.capability.1,
        info.free_bytes >> 20,
        info.total_bytes >> 20
    )
}

fn serve_generate(
    channel: &mut Channel,
    model: TextModel,
    max_sequences: usize,
    device: Option<String>,
) -> ExitCode {
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
                    device,
                },
            ) {
                return ExitCode::FAILURE;
            }
            serve_batched(channel, &model, batch, limits)
        }
        // A reference architecture: one generation at a time.
        Err(_) => {
            if !send(
                channel,
                &FromWorker::Ready {
                    sequences: 1,
                    device,
                },
            ) {
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

fn serve_embed(channel: &mut Channel, model: Embedder, device: Option<String>) -> ExitCode {
    if let Err(e) = super::start_threads_then_cap() {
        return fail(channel, None, e);
    }
    if !send(
        channel,
        &FromWorker::Ready {
            sequences: 1,
            device,
        },
    ) {
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

/// Entry point of `securerun __probe NAME PARENT_PID DEVICE`: confine strictly (with the GPU
/// profile for a CUDA device, its libraries loaded first as a worker does), then try the
/// escape. `report` confines permissively and reports the layers; `device` confines strictly,
/// initialises the device, caps threads and computes on it, as a GPU worker would.
pub fn probe_main(args: &[String]) -> ExitCode {
    let [name, parent, device] = args else {
        return ExitCode::from(2);
    };
    let Ok((mut channel, _)) = securerun_sandbox::inherited(0) else {
        return ExitCode::from(2);
    };
    let Ok(device) = device.parse::<DeviceChoice>() else {
        return ExitCode::from(2);
    };
    let libraries = match device {
        DeviceChoice::Cpu => Ok(Vec::new()),
        DeviceChoice::Cuda(_) => securerun_models::cuda::load_libraries(),
    };
    let report_only = name == "report";
    let mode = if report_only {
        Mode::Permissive
    } else {
        Mode::Strict
    };
    // The probes run under the GPU profile even when the GPU cannot be selected (then with no
    // GPU node granted); the device check reports why it cannot.
    let selected = confinement(device, mode, 1 << 30);
    let (confinement, cuda_ordinal) = selected.clone().unwrap_or_else(|_| {
        let profile = securerun_sandbox::gpu::nvidia(None);
        (profile.confinement(mode, 1 << 30, GPU_OPEN_FILES), 0)
    });
    let confined = securerun_sandbox::confine(&confinement);
    if name == "device" {
        let result = confined
            .map_err(|e| e.to_string())
            .and_then(|_| libraries.map_err(|e| e.to_string()))
            .and_then(|_| selected.map(drop))
            .and_then(|_| device_self_test(device, cuda_ordinal));
        let (described, error) = match result {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        };
        send(&mut channel, &FromWorker::DeviceCheck { described, error });
        return ExitCode::SUCCESS;
    }
    let report = match confined {
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

/// In a confined process: initialise the device (CUDA's `ordinal`), start the compute threads
/// and cap them, then compute on the device (cuBLAS and a compiled kernel) and check the answer.
fn device_self_test(device: DeviceChoice, ordinal: usize) -> Result<String, String> {
    let DeviceChoice::Cuda(n) = device else {
        return Ok("cpu".into());
    };
    let (device, mut info) =
        securerun_models::cuda::open_device(ordinal).map_err(|e| e.to_string())?;
    info.ordinal = n;
    super::start_threads_then_cap()?;
    securerun_models::cuda::self_test(&device).map_err(|e| e.to_string())?;
    Ok(describe(&info))
}
