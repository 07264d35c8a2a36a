//! Faults fail closed, visibly: while the log cannot be written requests get 503, the fault is
//! counted in /metrics, and the first record after says what happened and for how long.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::p;
use crate::harness::*;

fn metric(addr: &str, token: &str, name: &str) -> u64 {
    let (status, body) = call_full(addr, "GET", "/metrics", Some(token), "");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("securerun_{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls until `f` holds (or panics after 10 s).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fault_records(auditor: &Auditor, state: &Path) -> Vec<serde_json::Value> {
    auditor.export(state, &["--event", "audit_fault"])
}

#[test]
fn a_live_segment_deleted_or_replaced_is_restored_and_recorded() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let t = token(s, "t", "embeddings,metrics");
    let auditor = Auditor::take(s);
    let server = serve(s, None).unwrap();
    let body = embed_body("before");
    assert_eq!(
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body),
        200
    );
    let live = seg(s, newest_epoch(s));
    let before = std::fs::read(&live).unwrap();
    std::fs::remove_file(&live).unwrap();
    eventually(
        "the deleted segment is restored within a second or two",
        || live.exists(),
    );
    assert!(std::fs::read(&live).unwrap().starts_with(&before));
    // The counters move just after the file is back in place: poll, do not race the writer.
    eventually("the restore is counted", || {
        metric(&server.addr, &t, "audit_files_restored_total") == 1
    });
    assert_eq!(
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body),
        200
    );
    // Replaced by another file (atomically, so the writer never sees it merely deleted):
    // restored, the impostor kept aside.
    let forged = s.join("audit").join(".forged");
    std::fs::write(&forged, b"forged").unwrap();
    std::fs::rename(&forged, &live).unwrap();
    eventually("the replaced segment is restored", || {
        std::fs::read(&live)
            .map(|b| b != b"forged")
            .unwrap_or(false)
    });
    let kept = std::fs::read_dir(s.join("audit"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("replaced-"));
    assert!(kept);
    eventually("both faults are counted", || {
        metric(&server.addr, &t, "audit_faults_total") >= 2
    });
    assert_eq!(
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body),
        200
    );
    server.stop();
    auditor.passes(s, &[]);
    let faults = fault_records(&auditor, s);
    assert!(
        faults
            .iter()
            .any(|r| r["detail"].as_str().unwrap().contains("was deleted")),
        "{faults:?}"
    );
    assert!(faults
        .iter()
        .any(|r| r["detail"].as_str().unwrap().contains("was replaced")));
}

/// Compiles an LD_PRELOAD shim from C `source` into `dir/NAME.so`.
fn compile_shim(dir: &Path, name: &str, source: &str) -> std::path::PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let lib = dir.join(format!("{name}.so"));
    let o = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o", p(&lib), p(&src), "-ldl"])
        .output()
        .expect("a C compiler (the Rust toolchain's linker)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    lib
}

/// An LD_PRELOAD shim makes `fdatasync` fail with EIO while a trigger file exists.
fn eio_shim(dir: &Path) -> std::path::PathBuf {
    compile_shim(
        dir,
        "eio",
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
int fdatasync(int fd) {
    const char *t = getenv("EIO_TRIGGER");
    if (t && access(t, F_OK) == 0) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
"#,
    )
}

#[test]
fn eio_on_sync_refuses_work_until_it_passes_and_the_next_record_says_so() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let t = token(s, "t", "embeddings,metrics");
    let auditor = Auditor::take(s);
    let shim = eio_shim(s);
    let trigger = s.join("eio-now");
    let server = serve_env(
        s,
        None,
        &[],
        &[("LD_PRELOAD", &shim), ("EIO_TRIGGER", &trigger)],
    )
    .unwrap();
    let body = embed_body("hi");
    assert_eq!(
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body),
        200
    );
    std::fs::write(&trigger, b"").unwrap();
    let refused: Vec<u16> = (0..3)
        .map(|_| call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body))
        .collect();
    assert_eq!(refused, vec![503, 503, 503]);
    std::fs::remove_file(&trigger).unwrap();
    eventually("the log recovers once syncs pass", || {
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body) == 200
    });
    assert_eq!(metric(&server.addr, &t, "audit_faults_total"), 1);
    assert!(metric(&server.addr, &t, "audit_records_refused_total") >= 1);
    server.stop();
    auditor.passes(s, &[]);
    let faults = fault_records(&auditor, s);
    assert_eq!(faults.len(), 1, "{faults:?}");
    let detail = faults[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("Input/output error") && detail.contains("for "),
        "{detail}"
    );
    // Every request answered 200 has its record; none of the refused ones claims success.
    let ok = auditor
        .export(s, &[])
        .iter()
        .filter(|r| r["event"] == "request" && r["outcome"] == "ok")
        .count();
    assert!(ok >= 2);
}

#[test]
fn an_unwritable_checkpoint_sink_refuses_work_until_it_is_back() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let t = token(s, "t", "embeddings,metrics");
    let auditor = Auditor::take(s);
    let sink_dir = tempfile::tempdir().unwrap();
    let mount = sink_dir.path().join("other-mount");
    std::fs::create_dir(&mount).unwrap();
    let sink = mount.join("heads.jsonl");
    let config = s.join("serve.toml");
    std::fs::write(&config, "audit_rotate = 1\n").unwrap();
    let spec = format!("file:{}", sink.display());
    let server = serve_with(
        s,
        None,
        &["--config", p(&config), "--checkpoint-sink", &spec],
    )
    .unwrap();
    let body = embed_body("hi");
    assert_eq!(
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body),
        200
    );
    std::fs::remove_dir_all(&mount).unwrap();
    // The next epoch's handover cannot reach the sink: refused from then on.
    eventually("refused once the sink is gone", || {
        std::thread::sleep(Duration::from_millis(400));
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body) == 503
    });
    assert_eq!(
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body),
        503
    );
    std::fs::create_dir(&mount).unwrap();
    eventually("serving again once the sink is back", || {
        call(&server.addr, "POST", "/v1/embeddings", Some(&t), &body) == 200
    });
    assert!(metric(&server.addr, &t, "audit_faults_total") >= 1);
    server.stop();
    auditor.passes(s, &["--anchor", p(&sink)]);
    let faults = fault_records(&auditor, s);
    assert!(
        faults
            .iter()
            .any(|r| r["detail"].as_str().unwrap().contains("checkpoint sink")),
        "{faults:?}"
    );
}

/// An LD_PRELOAD shim that kills the process (SIGKILL) just before its Nth `rename()` of a path
/// containing `$CRASH_AT`: a crash at an exact step of an epoch handover.
fn crash_shim(dir: &Path) -> std::path::PathBuf {
    compile_shim(
        dir,
        "crash",
        r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int seen = 0;
int rename(const char *from, const char *to) {
    const char *at = getenv("CRASH_AT");
    const char *nth = getenv("CRASH_NTH");
    if (at && strstr(from, at) && ++seen == (nth ? atoi(nth) : 1)) { kill(getpid(), SIGKILL); pause(); }
    int (*real)(const char *, const char *) = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    return real(from, to);
}
"#,
    )
}

/// kill -9 at each step of an epoch handover (the wrapped key renamed into place, the next key
/// staged, the next key promoted): the next start completes or discards the step, and the log
/// verifies. (A crash before the first of these once left `key-E.tmp`, which the writer took
/// for a planted file and refused to start over.)
#[test]
fn a_crash_at_any_step_of_a_handover_leaves_a_log_that_starts_and_verifies() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let t = token(s, "t", "embeddings");
    let auditor = Auditor::take(s);
    let shim = crash_shim(s);
    for (at, nth) in [("key-0", "1"), ("next.key", "1"), ("next.key", "2")] {
        let crashed = serve_env(
            s,
            None,
            &[],
            &[
                ("LD_PRELOAD", &shim),
                ("CRASH_AT", Path::new(at)),
                ("CRASH_NTH", Path::new(nth)),
            ],
        );
        assert!(
            crashed.is_err(),
            "the crash point {at} #{nth} was not reached"
        );
        let server = serve(s, None).unwrap_or_else(|e| panic!("after a crash at {at} #{nth}: {e}"));
        embeds(&server.addr, &t, "x");
        server.stop();
        auditor.passes(s, &[]);
    }
}
