//! A hostile worker cannot hold the supervisor: per-frame deadlines that a drip-feeding worker
//! cannot stretch, empty or excess text frames refused, a cancellation that is ignored ends in
//! a kill, a silent worker meets the request's deadline, and the worker's counts are checked.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use securerun::worker::supervisor::{Event, RequestControl, CANCEL_GRACE};
use securerun::worker::{ConfinedModel, Task, WorkerError, WorkerSettings};
use securerun_models::{GenerationParams, PrefixKey, SamplingParams};

use super::common;
use super::harness::{fake_worker, fake_worker_ready};

fn params(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn start(
    dir: &std::path::Path,
    name: &str,
    script: &str,
    frame_timeout: Duration,
) -> ConfinedModel {
    let source = securerun::open(&common::smollm2(), &common::unsigned())
        .unwrap()
        .source()
        .clone();
    let mut settings = WorkerSettings::new().unwrap();
    settings.program = fake_worker(dir, name, script);
    settings.load_timeout = Duration::from_secs(5);
    settings.frame_timeout = frame_timeout;
    ConfinedModel::start(source, Task::Generate, Default::default(), settings).unwrap()
}

fn generate(
    m: &mut ConfinedModel,
    max_tokens: usize,
    deadline: Option<Instant>,
) -> Result<securerun_models::Generation, WorkerError> {
    let control = RequestControl {
        deadline,
        cancelled: &|| false,
    };
    m.generate_ids(
        &[504, 3575, 282, 4649, 314],
        &params(max_tokens),
        &control,
        &mut |_| ControlFlow::Continue(()),
    )
}

const DONE: &str = "msg({'type': 'done', 'id': r['id'], 'finish_reason': 'Length', 'prompt_tokens': len(r['prompt_ids']), 'token_ids': [1] * N, 'prefill_us': 1, 'decode_us': 1})";

#[test]
fn a_worker_that_drips_a_frame_cannot_stretch_the_frame_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    // One valid frame, one byte every 200 ms: each read is quick, the frame takes 20 s.
    let mut m = start(
        tmp.path(),
        "drip",
        "r = read()\np = json.dumps({'type': 'text', 'id': r['id'], 'text': 'x'}).encode()\n\
         ch.write(struct.pack('<I', len(p) + 1) + bytes([1]))\nfor b in p:\n    ch.write(bytes([b]))\n    time.sleep(0.2)\ntime.sleep(60)",
        Duration::from_secs(2),
    );
    let started = Instant::now();
    let err = generate(&mut m, 4, None).unwrap_err();
    assert!(matches!(err, WorkerError::Timeout(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(m.restarts, 1, "the worker is replaced");
}

#[test]
fn empty_and_excess_text_frames_and_false_counts_are_protocol_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("empty", "r = read()\nfor _ in range(100000): msg({'type': 'text', 'id': r['id'], 'text': ''})", "empty text piece"),
        ("excess", "r = read()\nfor _ in range(50): msg({'type': 'text', 'id': r['id'], 'text': 'a'})\ntime.sleep(30)", "more text pieces"),
        (
            "lying",
            &*format!("r = read()\nN = 2\nmsg({{'type': 'text', 'id': r['id'], 'text': 'a'}})\n{}", DONE.replace("len(r['prompt_ids'])", "999")),
            "prompt tokens reported",
        ),
        (
            "too_many_tokens",
            &*format!("r = read()\nN = 500\n{DONE}"),
            "tokens for max_tokens",
        ),
        (
            // Log-probabilities for a token it did not generate, and a positive one.
            "forged_logprobs",
            &*format!(
                "r = read()\nN = 2\n{}",
                DONE.replace(
                    "'decode_us': 1}",
                    "'decode_us': 1, 'logprobs': [{'id': 1, 'logprob': -0.5, 'top': []}, {'id': 7, 'logprob': 3.0, 'top': []}]}"
                )
            ),
            "log-probabilities that do not match",
        ),
    ];
    for (name, script, expected) in cases {
        let mut m = start(tmp.path(), name, script, Duration::from_secs(10));
        let err = generate(&mut m, 8, None).unwrap_err();
        assert!(matches!(err, WorkerError::Protocol(_)), "{name}: {err}");
        assert!(err.to_string().contains(expected), "{name}: {err}");
        assert_eq!(m.restarts, 1, "{name}");
    }
}

#[test]
fn a_silent_worker_meets_the_request_deadline_and_an_ignored_cancel_ends_in_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    // Silent forever, frame timeout far away: only the request's deadline can end it.
    let mut m = start(
        tmp.path(),
        "silent",
        "r = read()\ntime.sleep(600)",
        Duration::from_secs(300),
    );
    let started = Instant::now();
    let err = generate(&mut m, 8, Some(Instant::now() + Duration::from_secs(1))).unwrap_err();
    assert!(matches!(err, WorkerError::Timeout(_)), "{err}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1) + CANCEL_GRACE + Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(m.restarts, 1);

    // Keeps talking after Cancel and never says Done.
    let mut m = start(
        tmp.path(),
        "deaf",
        "r = read()\nwhile True:\n    msg({'type': 'text', 'id': r['id'], 'text': 'a'})\n    time.sleep(0.05)",
        Duration::from_secs(300),
    );
    let started = Instant::now();
    let mut seen = 0;
    let control = RequestControl {
        deadline: None,
        cancelled: &|| false,
    };
    let err = m
        .generate_ids(&[1, 2], &params(100_000), &control, &mut |_| {
            seen += 1;
            if seen == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, WorkerError::Timeout(_)), "{err}");
    assert!(started.elapsed() < CANCEL_GRACE + Duration::from_secs(3));
    assert_eq!(m.restarts, 1);
}

#[test]
fn a_cooperative_cancel_keeps_the_worker_and_reports_cancelled() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = start(
        tmp.path(),
        "polite",
        "while True:\n    r = read()\n    if r['type'] != 'generate': continue\n    n = 0\n    ch_ready = False\n    \
         while True:\n        msg({'type': 'text', 'id': r['id'], 'text': 'a'})\n        n += 1\n        time.sleep(0.05)\n        \
         import select\n        if select.select([ch], [], [], 0)[0]:\n            read()\n            break\n    \
         msg({'type': 'done', 'id': r['id'], 'finish_reason': 'Cancelled', 'prompt_tokens': len(r['prompt_ids']), 'token_ids': [1] * n, 'prefill_us': 1, 'decode_us': 1})",
        Duration::from_secs(10),
    );
    let g = generate(
        &mut m,
        1000,
        Some(Instant::now() + Duration::from_millis(500)),
    )
    .unwrap();
    assert_eq!(g.finish_reason, securerun_models::FinishReason::Cancelled);
    assert_eq!(m.restarts, 0);
}

/// A configuration that implies more memory than the worker may have (here: a rotary table and
/// KV cache for a million positions) is refused in the supervisor, with the estimate, before any
/// worker starts. Before the fix the worker started and died in its allocation.
#[test]
fn a_config_that_cannot_fit_is_refused_before_the_worker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::copy_dir(&common::smollm2(), &model);
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["max_position_embeddings"] = 1_000_000.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let o = common::securerun(&[
        "run",
        common::p(&model),
        "--allow-unsigned",
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
        "--worker-memory",
        "2048",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("needs about") && err.contains("KV cache"),
        "{err}"
    );
    // The real config fits the same budget.
    let o = common::securerun(&[
        "run",
        common::p(&common::smollm2()),
        "--allow-unsigned",
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
        "--worker-memory",
        "4096",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A chat template is code from the model file. One that doubles a string forty times must not
/// take the server's memory: templates render in the confined worker, whose address space is
/// capped, so the worker dies and is replaced, and the server keeps serving.
#[test]
fn a_memory_hungry_chat_template_is_contained_in_the_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::copy_dir(&common::smollm2(), &model);
    let path = model.join("tokenizer_config.json");
    let mut tc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    tc["chat_template"] = "{% set ns = namespace(x='aaaaaaaa') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}".into();
    std::fs::write(&path, tc.to_string()).unwrap();
    let state = tmp.path().join("state");
    let s = super::harness::Server::start(&model, &state, "", &[]);
    let t = s.token("c", &["--scopes", "inference"]);
    let chat = serde_json::json!({"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    let (status, body) =
        super::harness::call(s.addr, "POST", "/v1/chat/completions", Some(&t), &chat);
    assert!(status == 503 || status == 400, "{status} {body}");
    let (status, body) = super::harness::call(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&t),
        &serde_json::json!({"model": "model", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    s.stop();
}

/// The worker that replaces a crashed one computes with the verified bytes: weights changed in
/// place on disk after verification are caught by the signature check before the new worker
/// starts, the request fails, and the refusal is recorded. Before the fix the new worker loaded
/// the changed weights.
#[test]
fn a_replacement_worker_never_loads_weights_changed_since_verification() {
    use std::io::{Seek, SeekFrom, Write};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("minilm");
    common::copy_dir(&common::minilm(), &model);
    let key = tmp.path().join("site");
    assert!(common::securerun(&["keygen", "--out", common::p(&key)])
        .status
        .success());
    let o = common::securerun(&[
        "sign",
        common::p(&model),
        "--key",
        common::p(&tmp.path().join("site.key")),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state = tmp.path().join("state");
    let pubkey = tmp.path().join("site.pub");
    let s = super::harness::Server::start_with(
        &model,
        &state,
        "",
        &[],
        &["--trust-key", common::p(&pubkey)],
    );
    let t = s.token("c", &["--scopes", "embeddings"]);
    let body = serde_json::json!({"model": "minilm", "input": "hello"}).to_string();
    assert_eq!(
        super::harness::call(s.addr, "POST", "/v1/embeddings", Some(&t), &body).0,
        200
    );
    // Rewrite one weight byte in place (same inode, so the server's mapping sees it).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(model.join("model.safetensors"))
        .unwrap();
    f.seek(SeekFrom::End(-4)).unwrap();
    f.write_all(&[0x7f]).unwrap();
    f.sync_all().unwrap();
    // Kill the worker (the server's child) so a replacement is needed.
    let children = server_children(s.child.id());
    assert!(!children.is_empty());
    for pid in children {
        // SAFETY: signalling a process by pid (our server's worker).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(super::harness::call(s.addr, "POST", "/v1/embeddings", Some(&t), &body).0);
    }
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    s.stop_after(|records| {
        assert!(
            records.iter().any(|r| r["event"] == "worker_start_failed"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("changed on disk"))),
            "the refusal is recorded: {records:?}"
        );
    });
}

/// The children of a running server (its worker), by pid.
fn server_children(server: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{server}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The worker's memory cap follows the verified weights: a huge sparse file that no signature
/// covers, dropped beside the model, must not lift it. Before the fix the CLI summed the
/// directory listing (here: 1 TB) into the budget.
#[test]
fn an_unsigned_sparse_file_does_not_lift_the_memory_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("minilm");
    common::copy_dir(&common::minilm(), &model);
    let junk = std::fs::File::create(model.join("junk.bin")).unwrap();
    junk.set_len(1 << 40).unwrap();
    let state = tmp.path().join("state");
    let s = super::harness::Server::start(&model, &state, "", &[]);
    let workers = server_children(s.child.id());
    assert!(!workers.is_empty());
    for pid in workers {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max address space"))
            .unwrap();
        let cap: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        let weights = std::fs::metadata(model.join("model.safetensors"))
            .unwrap()
            .len();
        assert!(cap <= 4 * weights + (4 << 30), "{line}");
    }
    s.stop();
}

/// A worker that starts a frame and never finishes it, or never answers an embedding request,
/// meets the request's deadline (then it is killed and replaced), not the 300 s frame timeout.
#[test]
fn half_a_frame_or_a_silent_embedder_cannot_outlast_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = start(
        tmp.path(),
        "half",
        "r = read()\nch.write(b'\\x10')\ntime.sleep(600)",
        Duration::from_secs(300),
    );
    let started = Instant::now();
    let err = generate(&mut m, 8, Some(Instant::now() + Duration::from_secs(1))).unwrap_err();
    assert!(matches!(err, WorkerError::Timeout(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );

    let source = securerun::open(&common::minilm(), &common::unsigned())
        .unwrap()
        .source()
        .clone();
    let mut settings = WorkerSettings::new().unwrap();
    settings.program = fake_worker(tmp.path(), "mute", "r = read()\ntime.sleep(600)");
    settings.frame_timeout = Duration::from_secs(300);
    let mut e = ConfinedModel::start(source, Task::Embed, Default::default(), settings).unwrap();
    let started = Instant::now();
    let err = e
        .embed_by(
            &[securerun_models::EmbedInput::Text("hi".into())],
            Some(Instant::now() + Duration::from_secs(1)),
        )
        .unwrap_err();
    assert!(matches!(err, WorkerError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1) + CANCEL_GRACE + Duration::from_secs(2));
    assert_eq!(e.restarts, 1);
}

/// Starts a fake worker that says it batches `sequences` generations, asked for at most
/// `max_sequences`.
fn start_batching(
    dir: &std::path::Path,
    name: &str,
    script: &str,
    sequences: usize,
    max_sequences: usize,
) -> Result<ConfinedModel, WorkerError> {
    let source = securerun::open(&common::smollm2(), &common::unsigned())
        .unwrap()
        .source()
        .clone();
    let mut settings = WorkerSettings::new().unwrap();
    settings.program = fake_worker_ready(
        dir,
        name,
        &format!("{{'type': 'ready', 'sequences': {sequences}}}"),
        script,
    );
    settings.load_timeout = Duration::from_secs(5);
    settings.frame_timeout = Duration::from_secs(10);
    settings.max_sequences = max_sequences;
    ConfinedModel::start(source, Task::Generate, Default::default(), settings)
}

/// Collects events until every request named in `ids` has ended (or `limit` passes).
fn until_ended(
    m: &mut ConfinedModel,
    ids: &[u64],
    limit: Duration,
) -> Result<Vec<Event>, WorkerError> {
    let started = Instant::now();
    let mut events = Vec::new();
    let ended = |events: &[Event]| {
        ids.iter().all(|id| {
            events
                .iter()
                .any(|e| matches!(e, Event::Generated { id: got, .. } if got == id))
        })
    };
    while !ended(&events) {
        assert!(
            started.elapsed() < limit,
            "requests never ended: {events:?}"
        );
        events.extend(m.next_events(Duration::from_millis(50))?);
    }
    Ok(events)
}

#[test]
fn a_worker_cannot_claim_more_sequences_than_it_was_given() {
    let tmp = tempfile::tempdir().unwrap();
    let err = start_batching(tmp.path(), "greedy", "time.sleep(30)", 64, 4)
        .err()
        .expect("a worker claiming 64 sequences for 4 is refused");
    assert!(matches!(err, WorkerError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("64 sequences at once"), "{err}");
}

/// A worker's `ready` may name the accelerator it loaded the model on; the supervisor shows and
/// records that text. A CPU worker naming one is lying about where the model runs (a
/// protocol break); a GPU worker's description reaches the log only as printable text of
/// bounded length.
#[test]
fn a_worker_cannot_claim_a_device_and_its_description_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let source = securerun::open(&common::smollm2(), &common::unsigned())
        .unwrap()
        .source()
        .clone();
    let start = |name: &str, ready: &str, device: securerun::DeviceChoice| {
        let mut settings = WorkerSettings::new().unwrap();
        settings.program = fake_worker_ready(tmp.path(), name, ready, "time.sleep(30)");
        settings.load_timeout = Duration::from_secs(5);
        settings.device = device;
        ConfinedModel::start(source.clone(), Task::Generate, Default::default(), settings)
    };
    let err = start(
        "cpu_claims_gpu",
        "{'type': 'ready', 'device': 'cuda:0 (a GPU)'}",
        securerun::DeviceChoice::Cpu,
    )
    .err()
    .expect("a CPU worker claiming a GPU is refused");
    assert!(matches!(err, WorkerError::Protocol(_)), "{err}");
    let err = start(
        "gpu_says_nothing",
        "{'type': 'ready'}",
        securerun::DeviceChoice::Cuda(0),
    )
    .err()
    .expect("a GPU worker that names no device is refused");
    assert!(matches!(err, WorkerError::Protocol(_)), "{err}");
    let m = start(
        "gpu_floods",
        "{'type': 'ready', 'device': 'cuda:0\\n\\x1b[2Jforged line' + 'x' * 100000}",
        securerun::DeviceChoice::Cuda(0),
    )
    .unwrap();
    let shown = m.device().unwrap();
    assert!(shown.chars().count() <= 200, "{}", shown.len());
    assert!(!shown.chars().any(char::is_control), "{shown:?}");
    assert!(shown.starts_with("cuda:0[2Jforged line"), "{shown:?}");
}

/// With several requests in flight on one channel, a frame that names no request in flight
/// (a finished one, an invented one) breaks the protocol: every request fails, the worker is
/// replaced. A worker cannot push text into another client's response.
#[test]
fn a_frame_for_a_request_not_in_flight_fails_every_request_and_replaces_the_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("invented", "a = read(); b = read()\nmsg({'type': 'text', 'id': a['id'], 'text': 'x'})\nmsg({'type': 'text', 'id': a['id'] + b['id'] + 7, 'text': 'y'})\ntime.sleep(30)"),
        (
            "finished",
            &*format!("a = read(); b = read()\nr = a\nN = 1\n{}\nmsg({{'type': 'text', 'id': a['id'], 'text': 'late'}})\ntime.sleep(30)", DONE),
        ),
        ("render_text", "a = read(); b = read()\nmsg({'type': 'rendered', 'id': a['id'], 'text': 'x'})\ntime.sleep(30)"),
    ];
    for (name, script) in cases {
        let mut m = start_batching(tmp.path(), name, script, 2, 2).unwrap();
        let a = m
            .start_generate(&[1, 2, 3], &params(8), None, None)
            .unwrap();
        let b = m.start_generate(&[4, 5], &params(8), None, None).unwrap();
        let err = until_ended(&mut m, &[a, b], Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, WorkerError::Protocol(_)), "{name}: {err}");
        assert_eq!(m.restarts, 1, "{name}");
        assert_eq!(
            m.generations_in_flight(),
            0,
            "{name}: the lost requests are gone"
        );
    }
}

/// Each request in flight is bounded by its own max_tokens: a worker that overruns one
/// request's budget while another request is in flight is stopped.
#[test]
fn each_request_in_flight_is_held_to_its_own_max_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "a = read(); b = read()\nfor _ in range(50):\n    msg({'type': 'text', 'id': b['id'], 'text': 'b'})\n    msg({'type': 'text', 'id': a['id'], 'text': 'a'})\ntime.sleep(30)";
    let mut m = start_batching(tmp.path(), "overrun", script, 2, 2).unwrap();
    let a = m
        .start_generate(&[1, 2, 3], &params(4), None, None)
        .unwrap();
    let b = m
        .start_generate(&[4, 5], &params(1000), None, None)
        .unwrap();
    let err = until_ended(&mut m, &[a, b], Duration::from_secs(10)).unwrap_err();
    assert!(
        err.to_string()
            .contains("more text pieces than max_tokens 4"),
        "{err}"
    );
    assert_eq!(m.restarts, 1);
}

/// The cached-token count a worker reports reaches the client (`usage`): a worker cannot
/// claim that the whole prompt, or more, came from its cache.
#[test]
fn a_worker_cannot_claim_more_cached_tokens_than_the_prompt_allows() {
    let tmp = tempfile::tempdir().unwrap();
    for cached in ["len(r['prompt_ids'])", "10**6"] {
        let script = format!(
            "r = read()\nmsg({{'type': 'text', 'id': r['id'], 'text': 'x'}})\nmsg({{'type': 'done', 'id': r['id'], 'finish_reason': 'Length', 'prompt_tokens': len(r['prompt_ids']), 'cached_tokens': {cached}, 'token_ids': [1], 'prefill_us': 1, 'decode_us': 1}})\ntime.sleep(30)"
        );
        let mut m = start_batching(tmp.path(), "cached", &script, 2, 2).unwrap();
        let a = m
            .start_generate(&[1, 2, 3], &params(4), Some(PrefixKey(1)), None)
            .unwrap();
        let err = until_ended(&mut m, &[a], Duration::from_secs(10)).unwrap_err();
        assert!(err.to_string().contains("cached tokens"), "{cached}: {err}");
        assert_eq!(m.restarts, 1, "{cached}");
    }
}

/// One request past its deadline is cancelled on its own: the worker is told, the request
/// ends `Cancelled`, and the other request in flight runs to its end on the same worker.
#[test]
fn a_request_past_its_deadline_is_cancelled_and_the_others_run_on() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "import select\na = read(); b = read()\nlive = {a['id']: a, b['id']: b}\nn = {a['id']: 0, b['id']: 0}\n\
        def end(i, why):\n    r = live.pop(i)\n    msg({'type': 'done', 'id': i, 'finish_reason': why, 'prompt_tokens': len(r['prompt_ids']), 'token_ids': [1] * n[i], 'prefill_us': 1, 'decode_us': 1})\n\
        while live:\n    for i in list(live):\n        msg({'type': 'text', 'id': i, 'text': 'x'})\n        n[i] += 1\n        if i == b['id'] and n[i] >= 20:\n            end(i, 'Length')\n    \
        time.sleep(0.05)\n    while select.select([ch], [], [], 0)[0]:\n        c = read()\n        if c['type'] == 'cancel' and c['id'] in live:\n            end(c['id'], 'Cancelled')\n\
        time.sleep(30)";
    let mut m = start_batching(tmp.path(), "polite", script, 2, 2).unwrap();
    let a = m
        .start_generate(
            &[1, 2, 3],
            &params(100),
            None,
            Some(Instant::now() + Duration::from_millis(300)),
        )
        .unwrap();
    let b = m.start_generate(&[4, 5], &params(100), None, None).unwrap();
    let events = until_ended(&mut m, &[a, b], Duration::from_secs(10)).unwrap();
    let ended = |id| {
        events.iter().find_map(|e| match e {
            Event::Generated { id: got, result } if *got == id => Some(result.as_ref().unwrap()),
            _ => None,
        })
    };
    let (ga, gb) = (ended(a).unwrap(), ended(b).unwrap());
    assert_eq!(ga.finish_reason, securerun_models::FinishReason::Cancelled);
    assert!(ga.token_ids.len() < 20, "{}", ga.token_ids.len());
    assert_eq!(gb.finish_reason, securerun_models::FinishReason::Length);
    assert_eq!(gb.text, "x".repeat(20));
    assert_eq!(m.restarts, 0, "a cooperative cancel keeps the worker");
}

/// A worker that stops reading cannot block the supervisor's sends (several requests now
/// write to one channel): a request too large for the socket buffers fails after the frame
/// timeout, and the worker is replaced. Before, the send blocked for ever.
#[test]
fn a_worker_that_stops_reading_cannot_block_the_supervisor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = start(
        tmp.path(),
        "deaf_reader",
        "time.sleep(60)",
        Duration::from_secs(2),
    );
    let started = Instant::now();
    let huge = vec![1u32; 2_000_000]; // ~4 MB of JSON, far beyond the socket buffers
    let err = m
        .start_generate(&huge, &params(4), None, None)
        .expect_err("the send must give up");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, WorkerError::Protocol(_) | WorkerError::Timeout(_)),
        "{err}"
    );
    assert_eq!(m.restarts, 1, "the worker is replaced");
}
