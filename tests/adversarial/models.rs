//! Several models in one server: each token reaches only the models it names, one audit log
//! records them all, and a model is replaced live (admin API, SIGHUP, `securerun reload`)
//! without dropping a request, never by weights that fail verification.

use std::time::Duration;

use super::common::{self, p, securerun};
use super::harness::{call, completion, eventually, Server, LONG_PROMPT, SMOL};

const MINILM: &str = "minilm";

fn embedding(model: &str) -> String {
    serde_json::json!({"model": model, "input": "hello"}).to_string()
}

fn listed(addr: std::net::SocketAddr, token: &str) -> Vec<String> {
    let (status, out) = call(addr, "GET", "/v1/models", Some(token), "");
    assert_eq!(status, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// The server's worker processes (one per served model, while confined).
fn workers(server: u32) -> usize {
    std::fs::read_dir(format!("/proc/{server}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .map(|c| c.split_whitespace().count())
        .sum()
}

#[test]
fn two_models_in_one_server_share_one_token_store_and_one_audit_log() {
    let state = tempfile::tempdir().unwrap();
    let minilm = format!("{MINILM}={}", p(&common::minilm()));
    let s = Server::start_with(
        &common::smollm2(),
        state.path(),
        "",
        &[],
        &["--allow-unsigned", "--model", &minilm],
    );
    assert_eq!(workers(s.child.id()), 2, "one confined worker per model");
    let text = s.token(
        "text",
        &["--scopes", "inference,embeddings", "--models", SMOL],
    );
    let embed = s.token("embed", &["--scopes", "embeddings", "--models", MINILM]);
    let both = s.token("both", &["--scopes", "inference,embeddings"]);

    assert_eq!(listed(s.addr, &text), [SMOL]);
    assert_eq!(listed(s.addr, &embed), [MINILM]);
    let mut all = listed(s.addr, &both);
    all.sort();
    assert_eq!(all, [MINILM, SMOL]);

    let completion = completion("Hello", 4, false);
    assert_eq!(
        call(s.addr, "POST", "/v1/completions", Some(&text), &completion).0,
        200
    );
    let (status, out) = call(
        s.addr,
        "POST",
        "/v1/embeddings",
        Some(&both),
        &embedding(MINILM),
    );
    assert_eq!(status, 200, "{out}");
    // A token for one model cannot reach the other, whatever its scopes.
    let (status, out) = call(
        s.addr,
        "POST",
        "/v1/embeddings",
        Some(&text),
        &embedding(MINILM),
    );
    assert!(status == 403, "{status} {out}");
    let (status, out) = call(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&embed),
        &completion.replace(SMOL, MINILM),
    );
    assert!(status == 403, "{status} {out}");
    // Each model does its own task only; an unknown model is not found.
    let (status, out) = call(
        s.addr,
        "POST",
        "/v1/embeddings",
        Some(&both),
        &embedding(SMOL),
    );
    assert_eq!(status, 400, "{out}");
    let (status, _) = call(
        s.addr,
        "POST",
        "/v1/embeddings",
        Some(&both),
        &embedding("other"),
    );
    assert_eq!(status, 404);
    // A wrong method gets the API's error shape, not an empty body.
    let admin = s.token("admin", &["--scopes", "admin"]);
    let (status, out) = call(
        s.addr,
        "GET",
        &format!("/admin/models/{MINILM}/reload"),
        Some(&admin),
        "",
    );
    assert_eq!(status, 405, "{out}");
    assert!(out.contains("method_not_allowed"), "{out}");

    // Two `securerun reload` at once each get their own answer (found by an attack helper:
    // they shared one request file, one was lost and its CLI waited in vain).
    let state_dir = s.state.clone();
    let reloads: Vec<_> = [SMOL, MINILM]
        .into_iter()
        .map(|name| {
            let state_dir = state_dir.clone();
            std::thread::spawn(move || {
                securerun(&[
                    "reload",
                    name,
                    "--wait",
                    "120",
                    "--state-dir",
                    p(&state_dir),
                ])
            })
        })
        .collect();
    for (reload, name) in reloads.into_iter().zip([SMOL, MINILM]) {
        let o = reload.join().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains(&format!("{name}: replaced")), "{out}");
    }
    assert_eq!(
        call(s.addr, "POST", "/v1/completions", Some(&text), &completion).0,
        200
    );

    s.stop_after(|records| {
        let requests = |model: &str, status: u64| {
            records
                .iter()
                .filter(|r| r["event"] == "request" && r["model"] == model && r["status"] == status)
                .count()
        };
        assert_eq!(requests(SMOL, 200), 2, "{records:?}");
        assert_eq!(requests(MINILM, 200), 1);
        assert_eq!(requests(MINILM, 403), 1);
        // A name that is not served never reaches the record.
        assert!(!records.iter().any(|r| r["model"] == "other"));
        let started: Vec<_> = records
            .iter()
            .filter(|r| r["event"] == "sandbox_started")
            .map(|r| r["model"].as_str().unwrap().to_string())
            .collect();
        // At start, then each replacement (in whichever order the two were asked).
        assert_eq!(started[..2], [SMOL, MINILM]);
        let mut replaced = started[2..].to_vec();
        replaced.sort();
        assert_eq!(replaced, [MINILM, SMOL]);
    });
}

/// Replacing a model while clients stream from it: every request, before, during and after
/// the switch, completes in full; the old worker stops once its last request ends; the
/// replacement (admin API, then SIGHUP) is recorded with who asked.
#[test]
fn a_model_is_replaced_live_without_dropping_a_request() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(
        &common::smollm2(),
        state.path(),
        "max_sequences = 4\nqueue = 64\n",
        &[],
    );
    let user = s.token("user", &["--scopes", "inference", "--rate", "10000/min"]);
    let admin = s.token("admin", &["--scopes", "admin"]);
    let addr = s.addr;
    let stream_body = completion(LONG_PROMPT, 48, true);
    let streams: Vec<_> = (0..3)
        .map(|_| {
            let (user, body) = (user.clone(), stream_body.clone());
            std::thread::spawn(move || call(addr, "POST", "/v1/completions", Some(&user), &body))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let reload = {
        let admin = admin.clone();
        std::thread::spawn(move || {
            call(
                addr,
                "POST",
                &format!("/admin/models/{SMOL}/reload"),
                Some(&admin),
                "",
            )
        })
    };
    // Requests keep coming while the new version starts.
    let mut during = Vec::new();
    while !reload.is_finished() {
        during.push(
            call(
                addr,
                "POST",
                "/v1/completions",
                Some(&user),
                &completion("Hi", 2, false),
            )
            .0,
        );
    }
    let (status, out) = reload.join().unwrap();
    assert_eq!(status, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"], 1, "{out}");
    for stream in streams {
        let (status, out) = stream.join().unwrap();
        assert_eq!(status, 200, "{out}");
        assert!(out.contains("\"finish_reason\":\"length\""), "{out}");
        assert!(out.contains("data: [DONE]"), "{out}");
    }
    assert!(!during.is_empty());
    assert!(during.iter().all(|&s| s == 200), "{during:?}");
    assert_eq!(
        call(
            addr,
            "POST",
            "/v1/completions",
            Some(&user),
            &completion("Hi", 2, false)
        )
        .0,
        200
    );
    // The old version's worker ends after its last request.
    assert!(
        eventually(Duration::from_secs(10), || workers(s.child.id()) == 1),
        "the replaced worker still runs"
    );
    // SIGHUP replaces every model again.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGHUP) };
    std::thread::sleep(Duration::from_secs(1));
    assert!(eventually(Duration::from_secs(60), || {
        call(
            addr,
            "POST",
            "/v1/completions",
            Some(&user),
            &completion("Hi", 2, false),
        )
        .0 == 200
            && workers(s.child.id()) == 1
    }));
    let admin_id = admin.split('_').nth(1).unwrap().to_string();
    s.stop_after(|records| {
        let replaced: Vec<_> = records
            .iter()
            .filter(|r| r["event"] == "model_replaced" && r["outcome"] == "replaced")
            .map(|r| r["detail"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(replaced.len(), 2, "{replaced:?}");
        assert!(replaced[0].contains(&admin_id) && replaced[0].contains("version 1"));
        assert!(replaced[1].contains("SIGHUP") && replaced[1].contains("version 2"));
    });
}

/// A reload to weights that fail verification (changed after signing) is refused: the running,
/// verified version keeps serving the same answers, and the refusal is recorded.
#[test]
fn a_reload_to_weights_that_fail_verification_keeps_the_running_version() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join(MINILM);
    common::copy_dir(&common::minilm(), &model);
    let key = tmp.path().join("site");
    assert!(securerun(&["keygen", "--out", p(&key)]).status.success());
    let o = securerun(&["sign", p(&model), "--key", p(&tmp.path().join("site.key"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state = tmp.path().join("state");
    let s = Server::start_with(
        &model,
        &state,
        "",
        &[],
        &["--trust-key", p(&tmp.path().join("site.pub"))],
    );
    let t = s.token("c", &["--scopes", "embeddings"]);
    let (status, before) = call(
        s.addr,
        "POST",
        "/v1/embeddings",
        Some(&t),
        &embedding(MINILM),
    );
    assert_eq!(status, 200, "{before}");
    // A new file (new inode) in place of the weights: the running worker keeps its mapping.
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 4] ^= 0x01;
    let swapped = tmp.path().join("swapped.safetensors");
    std::fs::write(&swapped, bytes).unwrap();
    std::fs::rename(&swapped, &weights).unwrap();

    let o = securerun(&["reload", "--state-dir", p(&state), "--wait", "60"]);
    assert!(!o.status.success(), "the reload must fail");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("{MINILM}: kept")), "{out}");

    let (status, after) = call(
        s.addr,
        "POST",
        "/v1/embeddings",
        Some(&t),
        &embedding(MINILM),
    );
    assert_eq!(status, 200, "{after}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&before).unwrap()["data"],
        serde_json::from_str::<serde_json::Value>(&after).unwrap()["data"],
        "the verified version still answers"
    );
    s.stop_after(|records| {
        assert!(
            records.iter().any(|r| r["event"] == "model_replaced"
                && r["outcome"] == "refused"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("securerun reload"))),
            "{records:?}"
        );
    });
}
