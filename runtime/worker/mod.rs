//! Privilege separation: inference runs in a separate, confined worker process (the same
//! binary, re-executed as `securerun __worker`), and the supervisor keeps everything else.
//!
//! - [`supervisor`]: [`ConfinedModel`] starts and talks to the worker, restarts it when it dies.
//! - [`process`]: the worker's `main`, and the escape probes' `main` for `securerun doctor`.
//! - [`protocol`]: the messages between them.

pub mod process;
pub mod protocol;
pub mod supervisor;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

pub use protocol::{LayerMsg, Task};
pub use supervisor::{ConfinedModel, WorkerError, WorkerSettings, WorkerState, WorkerStatus};

use securerun_sandbox::probe::{EXIT_BLOCKED, EXIT_ESCAPED, PROBES};
use securerun_sandbox::WorkerSpec;

use crate::open::DeviceChoice;

/// The outcome of one escape probe.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub name: &'static str,
    pub attempt: &'static str,
    pub blocked: bool,
    pub how: String,
}

/// Starts every compute thread the worker will use, then forbids new ones for good (the thread
/// cap, [`securerun_sandbox::forbid_new_threads`]). candle 0.11 computes on three pools, each
/// built lazily on first use and sized by `RAYON_NUM_THREADS` (set by the supervisor): rayon's
/// global pool (gemm, tokenizers), candle's private rayon pool (`Device::with_context`) and
/// its barrier pool (quantized kernels). Each is built here and runs one task on every thread,
/// so every thread exists and has started before the cap. The worker calls this once its
/// model is loaded.
pub(crate) fn start_threads_then_cap() -> Result<(), String> {
    let started = std::panic::catch_unwind(|| {
        // An error only means that the global pool exists already.
        let _ = rayon::ThreadPoolBuilder::new().build_global();
        rayon::broadcast(|_| ());
        candle_core::utils::with_threadpool(|| rayon::broadcast(|_| ()));
        candle_core::utils::barrier_pool().execute(|_| ());
    });
    if started.is_err() {
        return Err("cannot start the compute threads".into());
    }
    securerun_sandbox::forbid_new_threads().map_err(|e| e.to_string())
}

fn probe_spec(program: &Path, args: &[&str], device: DeviceChoice) -> WorkerSpec {
    let name = device.to_string();
    WorkerSpec {
        program: program.to_path_buf(),
        args: std::iter::once("__probe")
            .chain(args.iter().copied())
            .chain(std::iter::once(name.as_str()))
            .map(Into::into)
            .collect(),
        env: supervisor::worker_env(device, 1),
        fds: Vec::new(),
        stderr: Stdio::piped(),
    }
}

/// What this host enforces: a worker for `device` confines itself permissively and reports
/// each layer.
pub fn host_layers(program: &Path, device: DeviceChoice) -> Result<Vec<LayerMsg>, WorkerError> {
    let mut p = securerun_sandbox::spawn(probe_spec(program, &["report", "0"], device))
        .map_err(|e| WorkerError::Spawn(e.to_string()))?;
    let bytes = p
        .channel
        .recv(protocol::MAX_FROM_WORKER, Some(Duration::from_secs(30)))
        .map_err(|e| WorkerError::Protocol(e.to_string()));
    let _ = p.child.wait();
    match serde_json::from_slice(&bytes?) {
        Ok(protocol::FromWorker::Confined { layers }) => Ok(layers),
        _ => Err(WorkerError::Protocol("no confinement report".into())),
    }
}

/// A confined worker for `device` initialises it, caps its threads and computes on it: the
/// device as the worker sees it, or why it cannot use it.
pub fn device_check(program: &Path, device: DeviceChoice) -> Result<String, String> {
    let mut p = securerun_sandbox::spawn(probe_spec(program, &["device", "0"], device))
        .map_err(|e| e.to_string())?;
    let bytes = p
        .channel
        .recv(protocol::MAX_FROM_WORKER, Some(Duration::from_secs(120)));
    let _ = p.child.kill();
    let _ = p.child.wait();
    match bytes.map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(protocol::FromWorker::DeviceCheck {
            described: Some(d),
            error: None,
        })) => Ok(supervisor::printable(&d, 200)),
        Ok(Ok(protocol::FromWorker::DeviceCheck { error: Some(e), .. })) => {
            Err(supervisor::printable(&e, 1000))
        }
        Ok(_) => Err("the check broke the protocol".into()),
        Err(e) => Err(format!("the check died or hung: {e}")),
    }
}

/// Runs every escape probe in its own strictly confined process, confined as a worker for
/// `device` is.
pub fn run_probes(program: &Path, device: DeviceChoice) -> Vec<ProbeResult> {
    let parent = std::process::id().to_string();
    PROBES
        .iter()
        .map(|&(name, attempt)| {
            let (blocked, how) = match run_probe(program, name, &parent, device) {
                Ok(r) => r,
                Err(e) => (false, format!("could not run: {e}")),
            };
            ProbeResult {
                name,
                attempt,
                blocked,
                how,
            }
        })
        .collect()
}

fn run_probe(
    program: &Path,
    name: &str,
    parent: &str,
    device: DeviceChoice,
) -> std::io::Result<(bool, String)> {
    let mut p = securerun_sandbox::spawn(probe_spec(program, &[name, parent], device))?;
    let mut err = String::new();
    if let Some(mut stderr) = p.child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    let status = p.child.wait()?;
    let err = err.trim().to_string();
    Ok(match (status.code(), status.signal()) {
        (Some(EXIT_BLOCKED), _) => (true, format!("refused: {err}")),
        (Some(EXIT_ESCAPED), _) => (false, "SUCCEEDED: the sandbox did not stop it".into()),
        (_, Some(libc::SIGSYS)) => (true, "process killed by the seccomp filter".into()),
        (_, Some(sig)) => (true, format!("process killed by signal {sig}")),
        (Some(code), _) => (
            false,
            format!("probe could not be set up (exit {code}): {err}"),
        ),
        (None, None) => (false, "unknown outcome".into()),
    })
}
