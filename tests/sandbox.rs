//! The confined worker, for real: escape probes that must fail, the kernel's view of the worker
//! (`Seccomp: 2`, `NoNewPrivs: 1`), output identical to in-process inference, recovery from a
//! killed worker, a memory budget that stops the worker and not the host, and hostile IPC from a
//! fake worker that must not take the supervisor down.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::{p, securerun};
use securerun::worker::{ConfinedModel, Task, WorkerError, WorkerSettings};
use securerun::{GenerationParams, Prompt};

/// `model`, opened unsigned, in a real confined worker.
fn confined(model: &std::path::Path) -> ConfinedModel {
    securerun::open(model, &common::unsigned())
        .unwrap()
        .confined(settings())
        .unwrap()
}

fn settings() -> WorkerSettings {
    let mut s = WorkerSettings::new().unwrap();
    // Integration tests run in the test binary; the worker is the real securerun binary.
    s.program = PathBuf::from(env!("CARGO_BIN_EXE_securerun"));
    s
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ..Default::default()
    }
}

fn prompt() -> Prompt {
    Prompt::Text("The capital of France is".into())
}

/// Each of `layers` is a line of doctor's report marked enforced.
fn assert_enforced(out: &str, layers: &[&str]) {
    for layer in layers {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(layer) && l.contains(" enforced ")),
            "{layer}: {out}"
        );
    }
}

#[test]
fn doctor_shows_every_layer_enforced_and_every_probe_blocked() {
    let o = securerun(&["doctor"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_enforced(
        &out,
        &[
            "rlimits",
            "parent death signal",
            "oom_score_adj",
            "namespaces",
            "empty root",
            "pid namespace",
            "no_new_privs",
            "capabilities",
            "landlock",
            "signal isolation",
            "seccomp",
            "thread cap",
        ],
    );
    for (name, _) in securerun_sandbox::probe::PROBES {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains("blocked")),
            "probe {name}: {out}"
        );
    }
    assert!(!out.contains("ESCAPED"), "{out}");
}

/// `doctor --device cuda` in a build without CUDA (CI's): the GPU profile is applied for real
/// (its device nodes do not exist here and are skipped), every escape is still refused, and
/// the device line says why there is no GPU. The command fails: no CPU in its place.
#[test]
fn doctor_under_the_gpu_profile_refuses_every_escape_and_names_the_missing_device() {
    let o = securerun(&["doctor", "--device", "cuda"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{out}");
    assert!(err.contains("not usable for cuda:0"), "{err}");
    assert!(out.contains("GPU profile (cuda:0)"), "{out}");
    assert_enforced(
        &out,
        &[
            "rlimits",
            "unprivileged user",
            "no_new_privs",
            "capabilities",
            "landlock",
            "signal isolation",
            "seccomp",
            "thread cap",
        ],
    );
    // The GPU profile's own marks: host memory bounded as data, the driver's calls added.
    assert!(out.contains("data 1024 MiB"), "{out}");
    assert!(out.contains("for the device)"), "{out}");
    for (name, _) in securerun_sandbox::probe::PROBES {
        let expected = if *name == "stat-host-path" {
            "visible"
        } else {
            "blocked"
        };
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains(expected)),
            "probe {name}: {out}"
        );
    }
    assert!(!out.contains("ESCAPED"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("cuda:0")
            && l.contains("UNUSABLE")
            && l.contains("this build has no CUDA support")),
        "{out}"
    );
}

#[test]
fn worker_runs_under_seccomp_and_no_new_privs_and_matches_in_process() {
    let model = common::smollm2();
    let mut confined = confined(&model);
    assert!(
        confined.layers().iter().all(|l| l.enforced),
        "{:?}",
        confined.layers()
    );
    let pid = confined.worker_pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("Seccomp:"), "2", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");

    let out = confined
        .generate(&prompt(), &greedy(12), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let mut local = securerun::open_text_model(&model, &common::unsigned()).unwrap();
    let expected = local
        .generate(&prompt(), &greedy(12), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(out.token_ids, expected.token_ids);
    assert_eq!(out.text, expected.text);
    assert!(out.text.starts_with(" Paris."), "{:?}", out.text);
}

#[test]
fn the_real_worker_is_pid_1_without_capabilities_capped_in_threads_and_first_for_the_oom_killer() {
    let model = common::smollm2();
    let mut confined = confined(&model);
    let spawned = confined.worker_pid().unwrap();
    // The supervisor's child is the PID namespace's reaper; the worker is its only child.
    let pid = securerun_sandbox::spawn::confined_pid(spawned);
    assert_ne!(pid, spawned, "no PID namespace");
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(adj.trim(), "1000");
    let status = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let before = status();
    assert_eq!(
        field(&before, "NSpid:").split_whitespace().last(),
        Some("1")
    );
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(&before, set), "0000000000000000", "{set}");
    }
    // tripwires, clone3 -> ENOSYS, the allowlist, and the thread cap installed after loading.
    assert_eq!(field(&before, "Seccomp_filters:"), "4", "{before}");
    let out = confined
        .generate(&prompt(), &greedy(8), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(out.text.starts_with(" Paris"), "{:?}", out.text);
    // Inference ran on the threads that existed before the cap: none was added.
    assert_eq!(
        field(&status(), "Threads:"),
        field(&before, "Threads:"),
        "{before}"
    );
}

#[test]
fn cli_output_is_identical_confined_and_in_process() {
    let model = common::smollm2();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "run",
            p(&model),
            "--allow-unsigned",
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "16",
            "--temperature",
            "0",
        ];
        a.extend_from_slice(extra);
        securerun(&a)
    };
    let confined = args(&[]);
    let local = args(&["--sandbox", "off"]);
    assert!(
        confined.status.success(),
        "{}",
        String::from_utf8_lossy(&confined.stderr)
    );
    assert!(local.status.success());
    assert_eq!(confined.stdout, local.stdout);
    assert!(String::from_utf8_lossy(&local.stderr).contains("--sandbox=off"));

    let minilm = common::minilm();
    let embed = |extra: &[&str]| {
        let mut a = vec!["embed", p(&minilm), "--allow-unsigned", "--text", "hi"];
        a.extend_from_slice(extra);
        securerun(&a).stdout
    };
    assert_eq!(embed(&[]), embed(&["--sandbox", "off"]));
}

#[test]
fn killed_worker_fails_the_request_clearly_and_the_next_one_succeeds() {
    let model = common::smollm2();
    let mut confined = confined(&model);
    let pid = confined.worker_pid().unwrap() as libc::pid_t;
    let err = confined
        .generate(&prompt(), &greedy(40), &mut |_| {
            // SAFETY: sending SIGKILL to our own child process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(matches!(err, WorkerError::Died(_)), "{err}");
    assert!(err.to_string().contains("killed (SIGKILL)"), "{err}");
    let again = confined
        .generate(&prompt(), &greedy(4), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(again.text.starts_with(" Paris"), "{:?}", again.text);
    assert_eq!(confined.restarts, 1);
    assert_ne!(confined.worker_pid().unwrap() as libc::pid_t, pid);

    // Cancellation from the client side stops generation early, worker intact.
    let mut pieces = 0;
    let cancelled = confined
        .generate(&prompt(), &greedy(40), &mut |_| {
            pieces += 1;
            if pieces == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(cancelled.finish_reason, securerun::FinishReason::Cancelled);
    assert!(cancelled.token_ids.len() < 40);
    assert_eq!(confined.restarts, 1);
}

#[test]
fn a_worker_over_its_memory_budget_is_stopped_not_the_host() {
    // Above the supervisor's estimate (192 MiB for MiniLM: the mapped file, its f32 tensors
    // copied to cache-line boundaries, activations), but not enough for the worker's whole
    // address space (its binary, libraries, thread stacks and allocator arenas): RLIMIT_AS is the
    // backstop for what no estimate sees.
    let o = securerun(&[
        "embed",
        p(&common::minilm()),
        "--allow-unsigned",
        "--text",
        "hi",
        "--worker-memory",
        "196",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("inference worker")
            && (err.contains("Cannot allocate memory") || err.contains("out of memory budget")),
        "{err}"
    );
}

/// A fake worker (a Python script) that speaks the frame format but misbehaves as `script` says.
fn fake_worker(dir: &Path, script: &str) -> WorkerSettings {
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap().trim().to_string();
    let path = dir.join(format!("worker-{}.py", script.len()));
    let body = format!(
        "#!{python}\nimport os, struct, json\nch = os.fdopen(3, 'r+b', buffering=0)\n\
         def frame(payload, version=1):\n    ch.write(struct.pack('<I', len(payload) + 1) + bytes([version]) + payload)\n\
         def msg(obj):\n    frame(json.dumps(obj).encode())\n\
         def readn(n):\n    b = b''\n    while len(b) < n:\n        b += ch.read(n - len(b))\n    return b\n\
         def read():\n    n = struct.unpack('<I', readn(4))[0]\n    return json.loads(readn(n)[1:])\n{script}\n"
    );
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut s = settings();
    s.program = path;
    s.load_timeout = std::time::Duration::from_secs(3);
    s.frame_timeout = std::time::Duration::from_secs(2);
    s
}

#[test]
fn hostile_worker_frames_do_not_take_the_supervisor_down() {
    let tmp = tempfile::tempdir().unwrap();
    let source = securerun::open(&common::smollm2(), &common::unsigned())
        .unwrap()
        .source()
        .clone();
    let start = |script: &str| {
        ConfinedModel::start(
            source.clone(),
            Task::Generate,
            Default::default(),
            fake_worker(tmp.path(), script),
        )
    };
    let confined = "msg({'type': 'confined', 'layers': []})";
    let ready = format!("{confined}\nread()\nmsg({{'type': 'ready'}})");
    let cases: Vec<(String, &str)> = vec![
        ("ch.write(struct.pack('<I', 0xFFFFFFFF))".into(), "exceeds"),
        ("frame(b'{}', version=7)".into(), "protocol version 7"),
        ("frame(b'not json')".into(), "bad message"),
        ("frame(b'')".into(), "bad message"),
        ("import sys; sys.exit(3)".into(), "exited with status 3"),
        ("import time; time.sleep(60)".into(), "did not answer"),
        (
            format!("{confined}\nread()\nmsg({{'type': 'text', 'id': 1, 'text': 'x'}})"),
            "unexpected",
        ),
    ];
    for (script, expected) in cases {
        let err = start(&script)
            .err()
            .expect("a hostile worker must not start");
        assert!(err.to_string().contains(expected), "{script}: {err}");
    }
    // A worker that loads, then answers for another request id, then floods text.
    let mut model = start(&format!(
        "{ready}\nread()\nmsg({{'type': 'text', 'id': 99, 'text': 'x'}})\nimport time; time.sleep(5)"
    ))
    .unwrap();
    let err = model
        .generate(&prompt(), &greedy(4), &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(matches!(err, WorkerError::Protocol(_)), "{err}");
    let mut model = start(&format!(
        "{ready}\nr = read()\nfor _ in range(1000): msg({{'type': 'text', 'id': r['id'], 'text': 'y' * 1000}})"
    ))
    .unwrap();
    let err = model
        .generate(&prompt(), &greedy(4), &mut |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(
        err.to_string().contains("more text than max_tokens allows"),
        "{err}"
    );
}

#[test]
fn a_seccomp_kill_is_told_by_the_exit_signal_not_by_what_the_worker_says() {
    let tmp = tempfile::tempdir().unwrap();
    let source = securerun::open(&common::smollm2(), &common::unsigned())
        .unwrap()
        .source()
        .clone();
    let ready = "msg({'type': 'confined', 'layers': []})\nread()\nmsg({'type': 'ready'})";
    let run = |script: &str| {
        let mut model = ConfinedModel::start(
            source.clone(),
            Task::Generate,
            Default::default(),
            fake_worker(tmp.path(), &format!("{ready}\n{script}")),
        )
        .unwrap();
        let err = model
            .generate(&prompt(), &greedy(4), &mut |_| ControlFlow::Continue(()))
            .unwrap_err();
        (err.to_string(), model.restarts, model.seccomp_kills)
    };
    // Killed by SIGSYS, as the seccomp filter does.
    let (err, restarts, kills) = run("read()\nimport signal; os.kill(os.getpid(), signal.SIGSYS)");
    assert!(err.contains("seccomp filter"), "{err}");
    assert_eq!((restarts, kills), (1, 1));
    // A worker that only claims it in its words, then breaks the protocol: not a violation.
    let (err, restarts, kills) = run(
        "r = read()\nmsg({'type': 'text', 'id': 99, 'text': 'killed by the seccomp filter (forbidden system call)'})",
    );
    assert_eq!((restarts, kills), (1, 0), "{err}");
}

/// Every sequence of a batch holds a KV cache: without `max_sequences` set, a worker whose
/// budget holds two of them runs two at once; asked for exactly four, the model is refused
/// before any worker starts, with the reason.
#[test]
fn the_number_of_sequences_follows_the_memory_budget_unless_set() {
    let source = securerun::open(&common::smollm2(), &common::unsigned())
        .unwrap()
        .source()
        .clone();
    let est = securerun_models::budget::estimate(&source, Default::default(), None).unwrap();
    let mut s = settings();
    s.memory_budget = Some(est.total() + est.kv_cache * 3 / 2);
    s.max_sequences = 4;
    s.sequences_by_memory = true;
    let m = ConfinedModel::start(
        source.clone(),
        Task::Generate,
        Default::default(),
        s.clone(),
    )
    .unwrap();
    assert_eq!(m.sequences(), 2);
    drop(m);
    s.sequences_by_memory = false;
    let err = ConfinedModel::start(source, Task::Generate, Default::default(), s)
        .err()
        .expect("four sequences do not fit");
    assert!(matches!(err, WorkerError::Model(_)), "{err}");
    assert!(err.to_string().contains("max_sequences"), "{err}");
}
