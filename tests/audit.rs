//! The audit log over a real server: every request and operator event recorded, nothing secret
//! or private in the files, every manipulation of the files detected with its position, signed
//! checkpoints checked with the public root alone, retention by crypto-shredding, and a server
//! that cannot write its log refusing work instead of serving unaudited.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{p, securerun};
use securerun::audit::{keys, segment, EpochKey};

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert!(self.child.wait().unwrap().success());
    }
}

/// Starts a server for MiniLM; `fsize` caps the files it may write (RLIMIT_FSIZE).
fn serve(state: &Path, fsize: Option<u64>) -> Result<Server, String> {
    serve_with(state, fsize, &[])
}

fn serve_with(state: &Path, fsize: Option<u64>, extra: &[&str]) -> Result<Server, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_securerun"));
    cmd.args([
        "serve",
        p(&common::minilm()),
        "--allow-unsigned",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .args(["--state-dir", p(state)])
    // Nobody reads stderr while the server runs: keep it quiet so the pipe never fills.
    .env("SECURERUN_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(limit) = fsize {
        // SAFETY: async-signal-safe calls only, in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                // The default SIGXFSZ disposition (terminate) stays: the server itself must turn
                // the limit into an EFBIG error it handles, not die of it.
                libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if !line.starts_with("listening on") {
        let out = child.wait_with_output().unwrap();
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let addr = line
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    Ok(Server { child, addr })
}

/// A raw HTTP/1.1 request; returns the status code.
fn call(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn token(state: &Path, name: &str, scopes: &str) -> String {
    let o = securerun(&[
        "token",
        "create",
        "--name",
        name,
        "--scopes",
        scopes,
        "--state-dir",
        p(state),
    ]);
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

fn audit(state: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["audit"];
    a.extend_from_slice(args);
    a.extend(["--state-dir", p(state)]);
    securerun(&a)
}

const SECRET_TEXT: &str = "Patient 4711 reported chest pain at the pump station";

/// A mixed session: a token created with no server running (epoch 1, recorded by the CLI),
/// then two server runs (epochs 2 and 3); returns the state dir and the token.
fn session() -> (tempfile::TempDir, String) {
    let state = tempfile::tempdir().unwrap();
    let t = token(state.path(), "analyst", "embeddings");
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": SECRET_TEXT}).to_string();
    for _ in 0..2 {
        let s = serve(state.path(), None).unwrap();
        assert_eq!(
            call(&s.addr, "POST", "/v1/embeddings", Some(&t), &body),
            200
        );
        assert_eq!(call(&s.addr, "POST", "/v1/embeddings", None, &body), 401);
        assert_eq!(call(&s.addr, "GET", "/v1/models", Some(&t), ""), 403);
        assert_eq!(
            call(
                &s.addr,
                "POST",
                "/v1/embeddings",
                Some(&t),
                &"x".repeat(2 << 20)
            ),
            413
        );
        s.stop();
    }
    (state, t)
}

fn export(state: &Path) -> Vec<serde_json::Value> {
    export_with(state, &["--format", "jsonl"])
}

#[test]
fn a_mixed_session_is_recorded_verifiable_and_private() {
    let (state, t) = session();
    let o = audit(state.path(), &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = export(state.path());
    let count = |event: &str, outcome: &str| {
        records
            .iter()
            .filter(|r| r["event"] == event && (outcome.is_empty() || r["outcome"] == outcome))
            .count()
    };
    assert_eq!(count("server_start", ""), 2);
    assert_eq!(count("server_stop", ""), 2);
    assert_eq!(count("model_verification", ""), 2);
    assert_eq!(count("request", "ok"), 2);
    assert_eq!(count("request", "refused_unauthenticated"), 2);
    assert_eq!(count("request", "refused_forbidden"), 2);
    assert_eq!(count("request", "refused_too_large"), 2);
    let ok = records.iter().find(|r| r["outcome"] == "ok").unwrap();
    for field in [
        "time_ms",
        "request_id",
        "token_id",
        "client",
        "model",
        "route",
        "status",
        "latency_ms",
    ] {
        assert!(!ok[field].is_null(), "{field} missing in {ok}");
    }
    // Sequence numbers are consecutive across both epochs.
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());

    // Filters and the report.
    let o = audit(state.path(), &["export", "--event", "server_start"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    let n = |args: &[&str]| export_with(state.path(), args).len();
    assert_eq!(n(&["--since", "2000-01-01"]), records.len());
    assert_eq!(n(&["--since", "1h"]), records.len());
    assert_eq!(n(&["--until", "2000-01-01T00:00:00Z"]), 0);
    assert_eq!(n(&["--since", "2999-01-01"]), 0);
    assert!(records[0]["time"].as_str().unwrap().ends_with('Z'));
    let report = String::from_utf8(audit(state.path(), &["report"]).stdout).unwrap();
    assert!(
        report.contains("refused_unauthenticated") && report.contains("per token"),
        "{report}"
    );

    // The CLI's token creation is recorded (epoch 1), with the token's id, never its secret.
    let created = records
        .iter()
        .find(|r| r["event"] == "token_created")
        .unwrap();
    assert_eq!(
        created["token_id"],
        t.split('_').nth(1).unwrap(),
        "{created}"
    );
    assert!(created["detail"]
        .as_str()
        .unwrap()
        .contains("by the securerun CLI"));
    assert_eq!(count("sandbox_started", "strict"), 2);

    // Nothing private or secret in the raw files.
    let secret = t.split('_').nth(2).unwrap();
    for bytes in raw_files(&state.path().join("audit")) {
        let text = String::from_utf8_lossy(&bytes);
        for needle in [SECRET_TEXT, "Patient", secret, "127.0.0.1", "analyst"] {
            assert!(
                !text.contains(needle),
                "{needle:?} found in the audit files"
            );
        }
    }
}

/// The contents of every file under `dir`.
fn raw_files(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(raw_files(&path));
        } else {
            out.push(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn copy(state: &Path) -> tempfile::TempDir {
    let c = tempfile::tempdir().unwrap();
    common::copy_dir(&state.join("audit"), &c.path().join("audit"));
    c
}

fn seg(state: &Path, epoch: u32) -> PathBuf {
    state.join("audit").join(segment::segment_name(epoch))
}

fn verify_fails(state: &Path, needle: &str) -> String {
    let o = audit(state, &["verify"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "manipulation not detected ({needle})");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

/// Frame boundaries of a segment: (offset, total length).
fn frames(path: &Path) -> Vec<(usize, usize)> {
    segment::read(path)
        .unwrap()
        .frames
        .iter()
        .map(|f| (f.offset as usize, f.body.len() + 4))
        .collect()
}

#[test]
fn every_manipulation_of_the_files_is_detected_with_its_position() {
    let (state, _) = session();
    // Epoch 1 holds the CLI's token record; 2 and 3 the two server runs.
    let original = seg(state.path(), 2);
    let bytes = std::fs::read(&original).unwrap();
    let fr = frames(&original);
    assert!(fr.len() >= 5);

    // A flipped byte inside a record.
    let c = copy(state.path());
    let mut b = bytes.clone();
    b[fr[2].0 + 50] ^= 1;
    std::fs::write(seg(c.path(), 2), &b).unwrap();
    let err = verify_fails(c.path(), "authentication failed");
    // Record numbers run on from epoch 1's records.
    let first = frames(&seg(state.path(), 1)).len() as u64;
    assert!(err.contains(&format!("record {}", first + 3)), "{err}");

    // A deleted record.
    let c = copy(state.path());
    let mut b = bytes.clone();
    b.drain(fr[2].0..fr[2].0 + fr[2].1);
    std::fs::write(seg(c.path(), 2), &b).unwrap();
    verify_fails(c.path(), &format!("sequence number {}", first + 4));

    // An inserted (duplicated) record.
    let c = copy(state.path());
    let mut b = bytes.clone();
    let dup = bytes[fr[1].0..fr[1].0 + fr[1].1].to_vec();
    b.splice(fr[2].0..fr[2].0, dup);
    std::fs::write(seg(c.path(), 2), &b).unwrap();
    verify_fails(c.path(), &format!("sequence number {}", first + 2));

    // Two records swapped.
    let c = copy(state.path());
    let mut b = bytes[..fr[1].0].to_vec();
    b.extend_from_slice(&bytes[fr[2].0..fr[2].0 + fr[2].1]);
    b.extend_from_slice(&bytes[fr[1].0..fr[1].0 + fr[1].1]);
    b.extend_from_slice(&bytes[fr[2].0 + fr[2].1..]);
    std::fs::write(seg(c.path(), 2), &b).unwrap();
    verify_fails(c.path(), "deleted, inserted or reordered");

    // Re-sealed with a later epoch's key (the thief holds the current key, not the earlier
    // ones): the record's own epoch key no longer opens it.
    let c = copy(state.path());
    let k0 = EpochKey::load(&state.path().join("audit").join(keys::READ_KEY)).unwrap();
    let later = EpochKey::load(&state.path().join("audit").join(keys::CURRENT_KEY)).unwrap();
    let contents = segment::read(&original).unwrap();
    let head_before = segment::read(&seg(state.path(), 1))
        .unwrap()
        .frames
        .iter()
        .fold([0u8; 32], |h, f| segment::chain(&h, &f.body));
    let (mut original_head, mut head) = (head_before, head_before);
    let mut b = Vec::new();
    for f in &contents.frames {
        let plain = f
            .open(&k0.advance_to(2).unwrap().record_key(), &original_head)
            .unwrap();
        original_head = segment::chain(&original_head, &f.body);
        let (frame, next) = segment::seal(&later.record_key(), f.seq, f.epoch, &head, &plain);
        b.extend_from_slice(&frame);
        head = next;
    }
    std::fs::write(seg(c.path(), 2), &b).unwrap();
    verify_fails(c.path(), "sealed with another epoch's key");

    // A missing middle segment; a missing newest segment.
    let c = copy(state.path());
    std::fs::remove_file(seg(c.path(), 2)).unwrap();
    verify_fails(c.path(), "a segment is missing");
    let c = copy(state.path());
    std::fs::remove_file(seg(c.path(), 3)).unwrap();
    verify_fails(c.path(), "the newest were removed");

    // A planted segment with a huge epoch number: reported at once, and a server refuses to
    // ratchet its key up to it (billions of steps) rather than hang.
    let c = copy(state.path());
    std::fs::write(c.path().join("audit/seg-4000000000.log"), b"").unwrap();
    let started = std::time::Instant::now();
    verify_fails(c.path(), "a segment is missing");
    let err = serve(c.path(), None).err().expect("must not start");
    assert!(err.contains("far ahead"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));

    // Whole records cut off the end: the stop's checkpoint attests them; so does an anchor
    // from an earlier verify.
    let o = audit(state.path(), &["verify"]);
    let out = String::from_utf8(o.stdout).unwrap();
    let anchor = out.split("head ").nth(1).unwrap().trim().to_string();
    let c = copy(state.path());
    let last = seg(c.path(), 3);
    let fr3 = frames(&last);
    let b = std::fs::read(&last).unwrap();
    std::fs::write(&last, &b[..fr3.last().unwrap().0]).unwrap();
    verify_fails(c.path(), "cut off the end");
    let o = audit(c.path(), &["verify", "--anchor", &anchor]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cut off the end"));

    // A torn tail (a crash while a batch was written, so no checkpoint attests it yet) is
    // reported, the complete records stand, and the next epoch acknowledges it.
    let c = copy(state.path());
    let last = seg(c.path(), 3);
    let mut b = std::fs::read(&last).unwrap();
    b.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&last, &b).unwrap();
    let o = audit(c.path(), &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("incomplete record"));
    let s = serve(c.path(), None).unwrap();
    s.stop();
    let o = audit(c.path(), &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let acknowledged = export(c.path())
        .into_iter()
        .any(|r| r["outcome"] == "torn_tail_found");
    assert!(acknowledged);
}

#[test]
fn a_server_that_cannot_write_its_audit_log_refuses_work() {
    // Cannot even create the log: does not start.
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("audit"), "not a directory").unwrap();
    let err = serve(state.path(), None).err().expect("must not start");
    assert!(err.contains("audit"), "{err}");

    // Runs out of space mid-way: requests get 503 and nothing is corrupted.
    let state = tempfile::tempdir().unwrap();
    let t = token(state.path(), "t", "embeddings");
    let s = serve(state.path(), Some(4096)).unwrap();
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "hi"}).to_string();
    let statuses: Vec<u16> = (0..20)
        .map(|_| call(&s.addr, "POST", "/v1/embeddings", Some(&t), &body))
        .collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.ends_with(&[503, 503, 503]), "{statuses:?}");
    assert_eq!(call(&s.addr, "GET", "/healthz", None, ""), 503);
    let mut child = s.child;
    let _ = child.kill();
    let _ = child.wait();
    let o = audit(state.path(), &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Every request answered 200 has its record.
    let ok = export(state.path())
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .count();
    assert_eq!(ok, statuses.iter().filter(|&&s| s == 200).count());
}

#[test]
fn lockdown_and_revoke_all_contain_an_incident_and_are_audited() {
    let state = tempfile::tempdir().unwrap();
    let user = token(state.path(), "user", "embeddings");
    let admin = token(state.path(), "admin", "admin");
    let s = serve(state.path(), None).unwrap();
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "hi"}).to_string();
    assert_eq!(
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body),
        200
    );

    assert!(securerun(&[
        "lockdown",
        "on",
        "--reason",
        "drill",
        "--state-dir",
        p(state.path())
    ])
    .status
    .success());
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body),
        503
    );
    // Admin requests still work, including turning lockdown off over the API.
    assert_eq!(
        call(
            &s.addr,
            "POST",
            "/admin/lockdown",
            Some(&admin),
            r#"{"on": false}"#
        ),
        200
    );
    assert_eq!(
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body),
        200
    );

    let o = securerun(&["token", "revoke", "--all", "--state-dir", p(state.path())]);
    assert!(o.status.success());
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body),
        401
    );
    s.stop();

    let events: Vec<String> = export(state.path())
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    for e in ["lockdown_on", "lockdown_off", "token_revoked"] {
        assert!(events.iter().any(|x| x == e), "{e} not audited: {events:?}");
    }
    // The running server recorded the lockdown with the reason the CLI gave.
    let on = export(state.path())
        .into_iter()
        .find(|r| r["event"] == "lockdown_on")
        .unwrap();
    assert!(on["detail"].as_str().unwrap().contains("drill"), "{on}");
    let refused = export(state.path())
        .iter()
        .filter(|r| r["outcome"] == "refused_lockdown")
        .count();
    assert_eq!(refused, 1);
}

/// Like [`call`], returning the status and the `x-request-id` header (None on a dropped
/// connection).
fn call_with_id(addr: &str, token: &str, body: &str) -> Option<(u16, Option<String>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .map(|v| v.trim().to_string());
    Some((status, id))
}

#[test]
fn kill_9_during_traffic_loses_no_answered_request() {
    let state = tempfile::tempdir().unwrap();
    let t = token(state.path(), "load", "embeddings");
    let mut s = serve(state.path(), None).unwrap();
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "hi"}).to_string();
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, t, body, answered) =
                (s.addr.clone(), t.clone(), body.clone(), answered.clone());
            std::thread::spawn(move || {
                while let Some((status, id)) = call_with_id(&addr, &t, &body) {
                    if status == 200 {
                        answered.lock().unwrap().push(id.expect("x-request-id"));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    s.child.kill().unwrap(); // SIGKILL, mid-traffic
    s.child.wait().unwrap();
    for c in clients {
        c.join().unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() > 5,
        "only {} requests answered",
        answered.len()
    );
    let o = audit(state.path(), &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recorded: std::collections::HashSet<String> = export(state.path())
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .filter_map(|r| r["request_id"].as_str().map(str::to_string))
        .collect();
    for id in &answered {
        assert!(
            recorded.contains(id),
            "answered request {id} has no audit record"
        );
    }
    // The next start continues the chain after the crash.
    let s = serve(state.path(), None).unwrap();
    s.stop();
    assert!(audit(state.path(), &["verify"]).status.success());
}

#[test]
fn audit_content_hmac_is_testable_and_full_is_opt_in_and_encrypted() {
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": SECRET_TEXT}).to_string();
    for mode in ["hmac", "full"] {
        let state = tempfile::tempdir().unwrap();
        let t = token(state.path(), "t", "embeddings");
        let s = serve_with(state.path(), None, &["--audit-content", mode]).unwrap();
        assert_eq!(
            call(&s.addr, "POST", "/v1/embeddings", Some(&t), &body),
            200
        );
        s.stop();
        let record = export(state.path())
            .into_iter()
            .find(|r| r["outcome"] == "ok")
            .unwrap();
        if mode == "hmac" {
            let o = audit(state.path(), &["hmac", SECRET_TEXT]);
            let fingerprint = String::from_utf8(o.stdout).unwrap().trim().to_string();
            assert_eq!(record["content_hmac"][0], fingerprint.as_str(), "{record}");
            assert!(record.get("content").is_none());
        } else {
            assert_eq!(record["content"]["texts"][0], SECRET_TEXT, "{record}");
        }
        // Either way the files on disk never hold the text.
        for bytes in raw_files(&state.path().join("audit")) {
            assert!(!String::from_utf8_lossy(&bytes).contains("Patient"));
        }
    }
}

#[test]
fn signed_checkpoints_verify_with_the_public_root_alone_and_catch_rewrites() {
    let (state, _) = session();
    let dir = state.path().join("audit");
    // The auditor keeps audit.pub; the host need not hold the read key for this check.
    let off_host = tempfile::tempdir().unwrap();
    let root = off_host.path().join("audit.pub");
    std::fs::copy(dir.join("audit.pub"), &root).unwrap();
    std::fs::rename(dir.join(keys::READ_KEY), off_host.path().join("read.key")).unwrap();
    let o = audit(state.path(), &["verify", "--public", p(&root)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The stop's checkpoint attests every record: none is left unattested.
    assert!(
        out.contains("integrity only") && out.contains("checkpoint (0)"),
        "{out}"
    );
    // Without the read key, reading is refused with a hint, not a crash.
    let o = audit(state.path(), &["export"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--key"));
    let read_key = off_host.path().join("read.key");
    let key_args = ["--key", p(&read_key)];
    let verify_with_key = |c: &Path, needle: &str| {
        for args in [vec!["verify"], vec!["verify", "--public", p(&root)]] {
            let mut a = args.clone();
            if args.len() == 1 {
                a.extend(key_args);
            }
            let o = audit(c, &a);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{a:?}: not detected ({needle})");
            assert!(err.contains(needle), "{a:?}: expected {needle:?} in {err}");
        }
    };

    let lines = |c: &Path| -> Vec<String> {
        std::fs::read_to_string(c.join("audit/checkpoints.jsonl"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let write_lines = |c: &Path, l: &[String]| {
        std::fs::write(c.join("audit/checkpoints.jsonl"), l.join("\n") + "\n").unwrap()
    };
    assert!(
        lines(state.path()).len() >= 4,
        "handovers and stop checkpoints"
    );

    // An edited checkpoint (its head changed) no longer verifies.
    let c = copy(state.path());
    let mut l = lines(c.path());
    let mut v: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
    v["head"] = "00".repeat(32).into();
    l[1] = v.to_string();
    write_lines(c.path(), &l);
    verify_with_key(c.path(), "does not verify");

    // The checkpoints removed altogether.
    let c = copy(state.path());
    std::fs::remove_file(c.path().join("audit/checkpoints.jsonl")).unwrap();
    verify_with_key(c.path(), "checkpoints were removed");

    // A thief of the host's current key rewrites an earlier epoch and re-signs a checkpoint
    // for it: the earlier epoch's key is gone, so the signature cannot be made.
    let c = copy(state.path());
    let current = EpochKey::load(&dir.join(keys::CURRENT_KEY)).unwrap();
    let mut l = lines(c.path());
    let victim: securerun::audit::checkpoint::Checkpoint = serde_json::from_str(&l[1]).unwrap();
    let mut forged =
        securerun::audit::checkpoint::Checkpoint::sign(&current, victim.seq, &[7; 32], None)
            .unwrap();
    forged.epoch = victim.epoch;
    l[1] = serde_json::to_string(&forged).unwrap();
    write_lines(c.path(), &l);
    verify_with_key(c.path(), "does not verify");

    // Records cut off the end are caught by the final checkpoint, without any anchor.
    let c = copy(state.path());
    let last = seg(c.path(), 3);
    let b = std::fs::read(&last).unwrap();
    std::fs::write(&last, &b[..frames(&last).last().unwrap().0]).unwrap();
    verify_with_key(c.path(), "cut off the end");
}

#[test]
fn retention_shreds_old_epochs_for_good_and_the_rest_still_verifies() {
    let (state, _) = session();
    let dir = state.path().join("audit");
    let off_host = tempfile::tempdir().unwrap();
    let key = off_host.path().join("read.key");
    std::fs::rename(dir.join(keys::READ_KEY), &key).unwrap();
    let before = export_with(state.path(), &["--key", p(&key)]);

    // Without --yes: a plan, nothing changes.
    let o = audit(
        state.path(),
        &["shred", "--before-epoch", "3", "--key", p(&key)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("would shred epochs 1..2"));
    assert!(seg(state.path(), 1).exists());
    assert_eq!(EpochKey::load(&key).unwrap().epoch, 0);
    // The current epoch is never shredded; nor is a log that does not verify.
    let o = audit(
        state.path(),
        &["shred", "--before-epoch", "9", "--key", p(&key), "--yes"],
    );
    assert!(!o.status.success());
    let c = copy(state.path());
    let mut b = std::fs::read(seg(c.path(), 2)).unwrap();
    b[60] ^= 1;
    std::fs::write(seg(c.path(), 2), &b).unwrap();
    let o = audit(
        c.path(),
        &["shred", "--before-epoch", "3", "--key", p(&key), "--yes"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not shredding"));
    assert!(seg(c.path(), 1).exists());

    // Shredding by age: every epoch that ended over a second ago, i.e. all but the newest.
    let old_segment = std::fs::read(seg(state.path(), 2)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let o = audit(
        state.path(),
        &["shred", "--older-than", "1s", "--key", p(&key), "--yes"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!seg(state.path(), 1).exists() && !seg(state.path(), 2).exists());
    let new_key = EpochKey::load(&key).unwrap();
    assert_eq!(new_key.epoch, 3);
    // The new read key cannot reach back: epoch 2's records are unreadable for good.
    assert!(new_key.advance_to(2).is_none());
    let frame = &segment::read_bytes(&old_segment).frames[0];
    let k3_record_key = new_key.record_key();
    assert!(frame.open(&k3_record_key, &[0; 32]).is_none());

    // What remains verifies (with the new read key, and with the public root), and the
    // shredding itself is on record.
    let o = audit(state.path(), &["verify", "--key", p(&key)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = audit(
        state.path(),
        &["verify", "--public", p(&dir.join("audit.pub"))],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = export_with(state.path(), &["--key", p(&key)]);
    assert!(after.len() < before.len());
    assert_eq!(
        after[0]["seq"].as_u64().unwrap(),
        before
            .iter()
            .find(|r| r["event"] == "audit_epoch_start"
                && r["detail"].as_str().unwrap().starts_with("epoch 3"))
            .unwrap()["seq"]
            .as_u64()
            .unwrap()
    );
    assert!(after.iter().any(|r| r["event"] == "audit_shredded"));
    // Deleting the oldest retained segment is not mistaken for retention.
    let c = copy(state.path());
    std::fs::remove_file(seg(c.path(), 3)).unwrap();
    let o = audit(c.path(), &["verify", "--key", p(&key)]);
    assert!(!o.status.success());
}

fn export_with(state: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["export"];
    args.extend_from_slice(extra);
    let o = audit(state, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn epochs_rotate_by_time_and_cli_actions_beside_a_running_server_are_recorded() {
    let state = tempfile::tempdir().unwrap();
    let t = token(state.path(), "t", "embeddings");
    let config = state.path().join("serve.toml");
    std::fs::write(&config, "audit_rotate = 1\n").unwrap();
    let s = serve_with(state.path(), None, &["--config", p(&config)]).unwrap();
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "hi"}).to_string();
    for _ in 0..3 {
        assert_eq!(
            call(&s.addr, "POST", "/v1/embeddings", Some(&t), &body),
            200
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // A trust change while the server holds the log: spooled, then recorded by the server.
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("site");
    assert!(securerun(&["keygen", "--out", p(&prefix)]).status.success());
    let o = securerun(&[
        "trust",
        "add",
        p(&dir.path().join("site.pub")),
        "--state-dir",
        p(state.path()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(std::time::Duration::from_millis(800));
    s.stop();
    let o = audit(state.path(), &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = export(state.path());
    let rotations = records
        .iter()
        .filter(|r| r["event"] == "audit_epoch_start")
        .filter(|r| r["detail"].as_str().unwrap().contains("rotation"))
        .count();
    assert!(rotations >= 2, "{rotations} rotations");
    let trusted = records
        .iter()
        .find(|r| r["event"] == "trust_key_added")
        .expect("spooled trust change recorded");
    assert!(trusted["detail"]
        .as_str()
        .unwrap()
        .contains("by the securerun CLI"));
    assert!(!state
        .path()
        .join("audit/spool")
        .read_dir()
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".json")));
}

#[test]
fn a_token_that_cannot_be_audited_is_not_created() {
    let state = tempfile::tempdir().unwrap();
    // The audit log cannot exist: its directory's place is taken by a file.
    std::fs::write(state.path().join("audit"), "not a directory").unwrap();
    let o = securerun(&[
        "token",
        "create",
        "--name",
        "ghost",
        "--scopes",
        "inference",
        "--state-dir",
        p(state.path()),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("token not created"), "{err}");
    // No secret was shown, and the store holds no live token.
    assert!(!String::from_utf8_lossy(&o.stdout).contains("srt_"));
    let list = securerun(&["token", "list", "--json", "--state-dir", p(state.path())]);
    let tokens: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 0, "{tokens}");
}

/// While the read key stays on the host, every server start says so.
#[test]
fn serve_warns_while_the_read_key_is_on_the_host() {
    let state = tempfile::tempdir().unwrap();
    let start = |state: &Path| {
        let log = state.join("stderr.txt");
        let mut child = Command::new(env!("CARGO_BIN_EXE_securerun"))
            .args([
                "serve",
                p(&common::minilm()),
                "--allow-unsigned",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--state-dir", p(state)])
            .env("SECURERUN_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening on"), "{line}");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
        std::fs::read_to_string(&log).unwrap()
    };
    let first = start(state.path());
    assert!(first.contains("read.key is still on this host"), "{first}");
    let second = start(state.path());
    assert!(
        second.contains("read.key is still on this host"),
        "{second}"
    );
    // Moved off the host: no warning.
    let off = tempfile::tempdir().unwrap();
    std::fs::rename(
        state.path().join("audit/read.key"),
        off.path().join("read.key"),
    )
    .unwrap();
    let third = start(state.path());
    assert!(!third.contains("still on this host"), "{third}");
}
