//! Command-line interface. Every failure is one line on stderr and a non-zero exit; nothing
//! panics out to the user (a panic is caught and reported as an internal error).

mod audit;
mod doctor;
mod embed;
mod inspect;
mod pack;
mod run;
mod serve;
mod serve_model;
mod signing;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{DeviceChoice, Limits, OpenOptions};

/// `--version`: the release, the commit it was built from, and what the build can do.
macro_rules! long_version {
    ($features:literal) => {
        concat!(
            env!("CARGO_PKG_VERSION"),
            "\ncommit: ",
            env!("SECURERUN_GIT_COMMIT"),
            "\nfeatures: ",
            $features,
            "\ntarget: ",
            env!("SECURERUN_TARGET"),
        )
    };
}
#[cfg(feature = "cuda")]
const LONG_VERSION: &str = long_version!("cuda");
#[cfg(not(feature = "cuda"))]
const LONG_VERSION: &str =
    long_version!("none (CPU only; CUDA needs a build with --features cuda)");

#[derive(Parser)]
#[command(
    name = "securerun",
    version,
    long_version = LONG_VERSION,
    about = "Secure, self-contained on-device inference",
    long_about = "Secure, self-contained on-device inference.\n\nMODEL is a Hugging Face-layout \
                  directory (config.json, tokenizer.json, model.safetensors or a sharded index) \
                  or a single .safetensors file made by `securerun pack`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's architecture, parameters, dtypes, tensors and metadata (runs nothing).
    Inspect(inspect::InspectArgs),
    /// Generate text; only the generated text goes to stdout.
    Run(run::RunArgs),
    /// Embed sentences; prints a JSON array of vectors.
    Embed(embed::EmbedArgs),
    /// Pack a model directory into one self-contained .safetensors file.
    Pack(pack::PackArgs),
    /// Create an ECDSA P-256 signing key pair (PREFIX.key, PREFIX.pub).
    Keygen(signing::KeygenArgs),
    /// Sign a model (OpenSSF model-signing format; key or certificate mode).
    Sign(signing::SignArgs),
    /// Verify a model's signature (key, certificate or keyless mode) against what is trusted.
    Verify(signing::VerifyArgs),
    /// Manage the trust store: keys whose model signatures `run` and `embed` accept.
    #[command(subcommand)]
    Trust(signing::TrustCommand),
    /// Show which sandbox layers this host enforces and try escapes from a confined worker.
    Doctor(doctor::DoctorArgs),
    /// Serve the model over an OpenAI-compatible REST API (tokens required, TLS off loopback).
    Serve(serve::ServeArgs),
    /// Manage access tokens for `serve`.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Verify, export, follow and summarize the encrypted audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Refuse (on) or serve again (off) every non-admin request on running servers.
    Lockdown {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// Why (kept in the lockdown file).
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout, or write one page per command into --out DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Replace served models by the versions on disk now, without downtime: each is verified
    /// and started beside the running one, then requests switch to it (also: SIGHUP, or
    /// POST /admin/models/NAME/reload).
    Reload {
        /// The models to replace (default: every model the server serves).
        models: Vec<String>,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// How long to wait for the server's answer, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        wait: u64,
    },
}

/// How inference is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// A confined worker process; refuse to run if any layer cannot be enforced.
    Strict,
    /// A confined worker with whatever layers this host supports (warns on stderr).
    Permissive,
    /// In this process, unconfined (warns on stderr; for debugging).
    Off,
}

/// Options shared by every command that opens a model.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Model directory or .safetensors file.
    model: PathBuf,
    /// Largest safetensors JSON header accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_header_len)]
    max_header_bytes: u64,
}

impl ModelArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_header_len: self.max_header_bytes,
            ..Limits::default()
        }
    }
}

/// Options of commands that run a model.
#[derive(Args, Clone)]
struct RunModelArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Run even without a valid signature from a trusted key (prints a warning).
    #[arg(long)]
    allow_unsigned: bool,
    #[command(flatten)]
    trust: signing::TrustArgs,
    /// Signature file (default: model.sig in a directory, FILE.sig beside a file).
    #[arg(long, value_name = "PATH")]
    signature: Option<PathBuf>,
    /// Compute threads (default: all available cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Compute device: cpu, cuda or cuda:N. CUDA needs a build from scripts/build-cuda.sh and
    /// the NVIDIA driver; its worker is confined with the GPU profile (`doctor --device cuda`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: DeviceChoice,
    /// Precision the weights are kept and computed at: auto (16-bit, bf16 or the file's f16,
    /// where the CPU has 16-bit kernels; else f32), f32, bf16, f16, q8_0, q4_0, q4_k. Quantized
    /// weights are made at load from the verified tensors; norms stay f32. Default: auto (or
    /// the serve config's `dtype`).
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<securerun_models::Precision>,
    /// Isolation of inference: a confined worker process (strict, the default; permissive),
    /// or none (off).
    #[arg(long, value_enum, value_name = "MODE", default_value = "strict")]
    sandbox: SandboxMode,
    /// Memory budget of the worker process in MiB (default: 4x the weights + 4 GiB).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(64..))]
    worker_memory: Option<u64>,
}

impl RunModelArgs {
    fn open_options(&self) -> Result<OpenOptions, Box<dyn std::error::Error>> {
        let trust = if self.allow_unsigned {
            crate::signing::TrustPolicy::default()
        } else {
            self.trust.policy()?
        };
        Ok(OpenOptions {
            limits: self.model.limits(),
            trust,
            signature: self.signature.clone(),
            allow_unsigned: self.allow_unsigned,
            device: self.device,
            progress: true,
            precision: self.dtype.unwrap_or_default(),
            // Without --worker-memory the budget follows the verified weights
            // (`worker::supervisor::default_memory_budget`), never the directory listing.
            memory_budget: self
                .worker_memory
                .map(|mib| {
                    mib.checked_mul(1 << 20).ok_or_else(|| {
                        format!("--worker-memory {mib} MiB is more bytes than fit in 64 bits")
                    })
                })
                .transpose()?,
        })
    }
}

impl RunModelArgs {
    /// Worker settings for this command, or `None` to run in process. Weaker modes are
    /// announced on stderr.
    fn worker_settings(
        &self,
    ) -> Result<Option<crate::worker::WorkerSettings>, Box<dyn std::error::Error>> {
        let mode = match self.sandbox {
            SandboxMode::Off => {
                eprintln!("warning: --sandbox=off: the model runs unconfined in this process");
                return Ok(None);
            }
            SandboxMode::Permissive => {
                eprintln!("warning: --sandbox=permissive: sandbox layers this host cannot enforce are skipped");
                securerun_sandbox::Mode::Permissive
            }
            SandboxMode::Strict => securerun_sandbox::Mode::Strict,
        };
        let mut settings = crate::worker::WorkerSettings::new()?;
        settings.mode = mode;
        // Test-only hook, compiled out of release builds: the adversarial suite replaces the
        // worker with a hostile program speaking the frame protocol.
        #[cfg(debug_assertions)]
        if let Some(program) = std::env::var_os("SECURERUN_TEST_WORKER_PROGRAM") {
            settings.program = program.into();
        }
        Ok(Some(settings))
    }
}

type CmdResult = Result<(), Box<dyn std::error::Error>>;

/// Records an operator action a CLI command is about to take, in the state directory's audit
/// log (creating the log if needed; see `audit::spool`). The record is durable (in the log, or
/// in the spool a running server drains) before this returns; on error the caller must not act.
pub(crate) fn record_admin(
    state_dir: Option<&std::path::Path>,
    record: crate::audit::AuditRecord,
) -> CmdResult {
    let state = crate::state_dir::resolve(state_dir.map(std::path::Path::to_path_buf))?;
    record_admin_in(&crate::audit::audit_dir(&state), record)?;
    Ok(())
}

/// [`record_admin`] that never creates the audit log: with no log yet, the record waits in the
/// log's spool (durable, 0600) and the log's first writer records it, marked as spooled. For
/// set-up commands (`trust add`) run before the operator has chosen how the log is created
/// (with an auditor's recipient key, or a read key on the host).
pub(crate) fn record_admin_no_create(
    state_dir: Option<&std::path::Path>,
    record: crate::audit::AuditRecord,
) -> CmdResult {
    let state = crate::state_dir::resolve(state_dir.map(std::path::Path::to_path_buf))?;
    let dir = crate::audit::audit_dir(&state);
    if crate::audit::exists(&dir) {
        record_admin_in(&dir, record)?;
        return Ok(());
    }
    let mut record = record;
    record.detail = Some(match record.detail.take() {
        Some(d) => format!("{d} (by the securerun CLI, before the audit log existed)"),
        None => "by the securerun CLI, before the audit log existed".into(),
    });
    crate::audit::spool::put(&dir, &record)
        .map_err(|e| format!("not done: the action could not be audited: {e}"))?;
    Ok(())
}

/// [`record_admin`] for an audit directory given directly.
pub(crate) fn record_admin_in(
    dir: &std::path::Path,
    record: crate::audit::AuditRecord,
) -> Result<crate::audit::spool::Recorded, Box<dyn std::error::Error>> {
    let not_done = |e: crate::audit::AuditError| -> Box<dyn std::error::Error> {
        format!("not done: the action could not be audited: {e}").into()
    };
    let created = crate::audit::init(dir, None).map_err(not_done)?;
    report_created(dir, created);
    let mut record = record;
    record.detail = Some(match record.detail.take() {
        Some(d) => format!("{d} (by the securerun CLI)"),
        None => "by the securerun CLI".into(),
    });
    crate::audit::spool::record_admin(dir, record).map_err(not_done)
}

/// Tells the operator about a log created now: where the read key is and that it belongs off
/// the host, or that the auditor's recipient key was used.
pub(crate) fn report_created(dir: &std::path::Path, created: crate::audit::Created) {
    if let Some(note) = created_note(dir, created) {
        eprintln!("note: {note}");
    }
}

/// What to tell the operator about a newly created audit log (`None`: it existed).
pub(crate) fn created_note(
    dir: &std::path::Path,
    created: crate::audit::Created,
) -> Option<String> {
    match created {
        crate::audit::Created::Existing => None,
        crate::audit::Created::WithHostReadKey => Some(format!(
            "created the audit log in {}; move {} off this host to the auditor (it reads the whole log; the host needs it for nothing) and give {} to your auditors. To create a log with no read key on the host: securerun audit keygen (on the auditor's machine), then securerun audit init --recipient",
            dir.display(),
            dir.join(crate::audit::recipient::READ_KEY).display(),
            dir.join(crate::audit::checkpoint::ROOT_PUB).display()
        )),
        crate::audit::Created::ForRecipient => Some(format!(
            "created the audit log in {} for the auditor's recipient key; give {} to your auditors",
            dir.display(),
            dir.join(crate::audit::checkpoint::ROOT_PUB).display()
        )),
    }
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    // Panics are reported by the catch below as one line, not by the default hook's backtrace.
    std::panic::set_hook(Box::new(|_| {}));
    // The hidden worker entry points: before anything else runs (no threads, no parsing).
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("__worker") => return crate::worker::process::main(&argv[2..]),
        Some("__probe") => return crate::worker::process::probe_main(&argv[2..]),
        _ => {}
    }
    // A file-size limit (RLIMIT_FSIZE) reached while writing the audit log must be an error the
    // writer handles (requests refused, the fault recorded), not a signal that kills the
    // process and leaves a torn record.
    // SAFETY: installing SIG_IGN for one signal; no handler code runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    set_compute_threads(&cli.command);
    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Run(args) => run::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Pack(args) => pack::run(args),
        Command::Keygen(args) => signing::keygen(args),
        Command::Sign(args) => signing::sign(args),
        Command::Verify(args) => signing::verify(args),
        Command::Trust(cmd) => signing::trust(cmd),
        Command::Doctor(args) => doctor::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Token(cmd) => token::run(cmd),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "securerun", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => man_pages(out),
        Command::Lockdown {
            state,
            reason,
            state_dir,
        } => (|| {
            let dir = crate::state_dir::resolve(state_dir)?;
            let mut r = crate::audit::AuditRecord::event(&format!("lockdown_{state}"));
            if !reason.is_empty() {
                r.detail = Some(format!("reason: {}", reason.replace('\n', " ")));
            }
            record_admin(Some(&dir), r)?;
            crate::lockdown::set(&dir, state == "on", &reason)?;
            eprintln!("lockdown {state} (running servers apply it within a second)");
            Ok(())
        })(),
        Command::Reload {
            models,
            state_dir,
            wait,
        } => (|| {
            let dir = crate::state_dir::resolve(state_dir)?;
            let nonce = crate::reload::ask(&dir, models)?;
            let Some(answer) =
                crate::reload::wait(&dir, &nonce, std::time::Duration::from_secs(wait))
            else {
                crate::reload::withdraw(&dir, &nonce);
                return Err(
                    "no answer from a server on this state directory (is one running?)".into(),
                );
            };
            let mut all = true;
            for o in &answer.outcomes {
                all &= o.replaced;
                let what = if o.replaced { "replaced" } else { "kept" };
                println!("{}: {what} ({})", o.model, o.detail);
            }
            if all {
                Ok(())
            } else {
                Err("not every model was replaced".into())
            }
        })(),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&*e));
            ExitCode::FAILURE
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            eprintln!("error: internal error: {}", sanitize(&msg));
            ExitCode::from(70)
        }
    }
}

/// Fixes the compute thread count before any thread exists. rayon reads RAYON_NUM_THREADS when
/// its pool starts; candle reads it on every matmul and, when it is unset, counts CPUs through
/// /proc each time (measured: 12% of decode, 23% of prefill on SmolLM2).
fn set_compute_threads(command: &Command) {
    let requested = match command {
        Command::Run(a) => a.threads(),
        Command::Embed(a) => a.threads(),
        Command::Serve(a) => a.threads(),
        _ => None,
    };
    let threads = requested.map(usize::from).or_else(|| {
        let from_env = std::env::var("RAYON_NUM_THREADS").ok();
        match from_env.as_deref().map(str::parse::<usize>) {
            Some(Ok(n)) if n > 0 => None,
            _ => Some(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    });
    if let Some(n) = threads {
        // Still single-threaded here (before any model code or rayon pool), so changing the
        // environment cannot race with a reader.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The error and its causes on one line, without repeating a cause already in the message.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    sanitize(&out)
}

fn sanitize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `securerun man`: the top page to stdout, or every command's page (`securerun-serve.1`, ...)
/// into `out`.
fn man_pages(out: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let Some(dir) = out else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(&dir)?;
    clap_mangen::generate_to(cmd, &dir)?;
    Ok(())
}
