//! The log as a server and the CLI write it: what is recorded, what is not in the files, and
//! what the commands need from the auditor.

use std::path::Path;

use crate::common::{p, securerun};
use crate::harness::*;

fn verify_ok(state: &Path) {
    let o = audit(state, &["verify", "--trust-local-key"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_mixed_session_is_recorded_verifiable_and_private() {
    let (state, t, auditor) = session();
    auditor.passes(state.path(), &[]);
    let records = auditor.export(state.path(), &[]);
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
    assert_eq!(
        auditor
            .export(state.path(), &["--event", "server_start"])
            .len(),
        2
    );
    let n = |args: &[&str]| auditor.export(state.path(), args).len();
    assert_eq!(n(&["--since", "2000-01-01"]), records.len());
    assert_eq!(n(&["--since", "1h"]), records.len());
    assert_eq!(n(&["--until", "2000-01-01T00:00:00Z"]), 0);
    assert_eq!(n(&["--since", "2999-01-01"]), 0);
    assert!(records[0]["time"].as_str().unwrap().ends_with('Z'));
    let mut args = vec!["report"];
    args.extend(auditor.full());
    let report = String::from_utf8(audit(state.path(), &args).stdout).unwrap();
    assert!(
        report.contains("refused_unauthenticated") && report.contains("per token"),
        "{report}"
    );

    // The CLI's token creation is recorded (epoch 2), with the token's id, never its secret.
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
    // `srt_<id>_<secret>_<check>`; the base64url secret may itself hold '_'.
    let secret = t.splitn(3, '_').nth(2).unwrap().rsplit_once('_').unwrap().0;
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
    drop(s); // killed, not stopped
    verify_ok(state.path());
    // Every request answered 200 has its record.
    let ok = export_local(state.path())
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

    let events: Vec<String> = export_local(state.path())
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    // The operator's revocation once (`tokens_revoked_all`), and the server dropping each
    // token from what it accepts (`token_unloaded`).
    for e in [
        "lockdown_on",
        "lockdown_off",
        "tokens_revoked_all",
        "token_unloaded",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} not audited: {events:?}");
    }
    // The running server recorded the lockdown with the reason the CLI gave.
    let on = export_local(state.path())
        .into_iter()
        .find(|r| r["event"] == "lockdown_on")
        .unwrap();
    assert!(on["detail"].as_str().unwrap().contains("drill"), "{on}");
    let refused = export_local(state.path())
        .iter()
        .filter(|r| r["outcome"] == "refused_lockdown")
        .count();
    assert_eq!(refused, 1);
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
    verify_ok(state.path());
    let recorded: std::collections::HashSet<String> = export_local(state.path())
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
    verify_ok(state.path());
}

#[test]
fn audit_content_is_recorded_only_with_consent_hmac_testable_full_encrypted() {
    let body = embed_body(SECRET_TEXT);
    for mode in ["hmac", "full"] {
        let state = tempfile::tempdir().unwrap();
        let without = token(state.path(), "no-consent", "embeddings");
        let o = securerun(&[
            "token",
            "create",
            "--name",
            "consented",
            "--scopes",
            "embeddings",
            "--consent-content",
            "--state-dir",
            p(state.path()),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let with = String::from_utf8(o.stdout).unwrap().trim().to_string();
        let list =
            String::from_utf8(securerun(&["token", "list", "--state-dir", p(state.path())]).stdout)
                .unwrap();
        let consent_lines: Vec<&str> = list.lines().filter(|l| l.contains("consent=")).collect();
        assert!(
            consent_lines.len() == 1 && consent_lines[0].contains("consented"),
            "{list}"
        );
        let s = serve_with(state.path(), None, &["--audit-content", mode]).unwrap();
        for t in [&without, &with] {
            assert_eq!(call(&s.addr, "POST", "/v1/embeddings", Some(t), &body), 200);
        }
        s.stop();
        let records = export_local(state.path());
        let id = |t: &str| t.split('_').nth(1).unwrap().to_string();
        let ok = |t: &str| {
            records
                .iter()
                .find(|r| {
                    r["event"] == "request"
                        && r["outcome"] == "ok"
                        && r["token_id"] == id(t).as_str()
                })
                .unwrap()
                .clone()
        };
        // No consent: nothing of the content, whatever the server's setting.
        let plain = ok(&without);
        assert!(plain.get("content").is_none() && plain.get("content_hmac").is_none());
        // The consent itself is on record: who, when, what.
        let consent = records
            .iter()
            .find(|r| r["event"] == "consent_content_given")
            .expect("consent recorded");
        assert_eq!(consent["token_id"], id(&with).as_str());
        assert!(consent["detail"]
            .as_str()
            .unwrap()
            .contains("securerun CLI"));
        let record = ok(&with);
        if mode == "hmac" {
            let o = audit(state.path(), &["hmac", SECRET_TEXT]);
            let fingerprint = String::from_utf8(o.stdout).unwrap().trim().to_string();
            assert_eq!(record["content_hmac"][0], fingerprint.as_str(), "{record}");
            assert!(record.get("content").is_none());
        } else {
            assert_eq!(record["content"]["texts"][0], SECRET_TEXT, "{record}");
        }
        // A data subject's access request: their records only.
        let mut a = vec!["export", "--trust-local-key", "--subject"];
        let subject = id(&with);
        a.push(&subject);
        let o = audit(state.path(), &a);
        let mine: Vec<serde_json::Value> = String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!mine.is_empty() && mine.iter().all(|r| r["token_id"] == subject.as_str()));
        // Either way the files on disk never hold the text.
        for bytes in raw_files(&state.path().join("audit")) {
            assert!(!String::from_utf8_lossy(&bytes).contains("Patient"));
        }
    }
}

/// Neither client addresses nor their pseudonyms reach the plaintext server log, even at
/// debug level.
#[test]
fn the_plaintext_server_log_holds_no_address_or_pseudonym() {
    let state = tempfile::tempdir().unwrap();
    let t = token(state.path(), "t", "embeddings");
    let log = state.path().join("server.log");
    let server = serve_logging(state.path(), "debug", &log);
    let addr = server.addr.clone();
    let body = embed_body("hi");
    assert_eq!(call(&addr, "POST", "/v1/embeddings", Some(&t), &body), 200);
    assert_eq!(
        call(&addr, "POST", "/v1/embeddings", Some("srt_wrong"), &body),
        401
    );
    assert_eq!(call(&addr, "POST", "/v1/embeddings", None, &body), 401);
    server.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let o = audit(state.path(), &["hmac", "127.0.0.1"]);
    let pseudonym = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert_eq!(pseudonym.len(), 32);
    assert!(text.lines().count() > 3, "{text}");
    assert!(
        !text.contains("127.0.0.1:") || text.lines().all(|l| !l.contains("client")),
        "{text}"
    );
    assert!(!text.contains(&pseudonym), "{text}");
    // The records do carry the pseudonym (that is where it belongs).
    assert!(export_local(state.path())
        .iter()
        .any(|r| r["client"] == pseudonym.as_str()));
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
    verify_ok(state.path());
    let records = export_local(state.path());
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
    // Nor does any other operator action take effect unrecorded.
    let o = securerun(&["lockdown", "on", "--state-dir", p(state.path())]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not done"), "{}", stderr(&o));
    assert!(!state.path().join("lockdown").exists());
    let keys = tempfile::tempdir().unwrap();
    assert!(
        securerun(&["keygen", "--out", p(&keys.path().join("site"))])
            .status
            .success()
    );
    let o = securerun(&[
        "trust",
        "add",
        p(&keys.path().join("site.pub")),
        "--state-dir",
        p(state.path()),
    ]);
    assert!(!o.status.success());
    assert!(
        !state.path().join("trust").exists()
            || std::fs::read_dir(state.path().join("trust"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// While the read key stays on the host, every server start says so.
#[test]
fn serve_warns_while_the_read_key_is_on_the_host() {
    let state = tempfile::tempdir().unwrap();
    let start = |state: &Path| {
        let log = state.join("stderr.txt");
        serve_logging(state, "error", &log).stop();
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

/// A log of the old (v1) format: verified read-only, refused by the new writer (never silently
/// continued or overwritten), and converted by `audit migrate`, which verifies it first.
#[test]
fn a_log_of_the_old_format_verifies_read_only_and_migrates() {
    use securerun::audit::v1;
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    let off = tempfile::tempdir().unwrap();
    let key_path = off.path().join("old-read.key");
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    std::fs::write(
        &key_path,
        format!("securerun-audit-key v1 0 {}\n", hex::encode(bytes)),
    )
    .unwrap();
    let k0 = v1::keys::EpochKey::load(&key_path).unwrap();
    let k1 = k0.next();
    let (mut head, mut seg) = ([0u8; 32], Vec::new());
    for (i, event) in ["server_start", "request", "server_stop"]
        .iter()
        .enumerate()
    {
        let json = serde_json::to_vec(&securerun::audit::AuditRecord::event(event)).unwrap();
        let (frame, next) = v1::segment::seal(&k1.record_key(), i as u64 + 1, 1, &head, &json);
        seg.extend_from_slice(&frame);
        head = next;
    }
    std::fs::write(dir.join("seg-00000001.log"), &seg).unwrap();
    let lines = [
        v1::checkpoint::Checkpoint::sign(&k0, 0, &[0; 32], Some(&k1)).unwrap(),
        v1::checkpoint::Checkpoint::sign(&k1, 3, &head, None).unwrap(),
    ]
    .iter()
    .map(|c| serde_json::to_string(c).unwrap() + "\n")
    .collect::<String>();
    std::fs::write(dir.join("checkpoints.jsonl"), lines).unwrap();

    // Read-only verification by the new verifier.
    let o = audit(state.path(), &["verify", "--key", p(&key_path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("old format"));
    // The new writer neither continues it nor starts a new log over it.
    let err = serve(state.path(), None)
        .err()
        .expect("must not start over an old log");
    assert!(err.contains("audit migrate"), "{err}");
    // A tampered old log is not migrated.
    let mut bad = seg.clone();
    bad[40] ^= 1;
    std::fs::write(dir.join("seg-00000001.log"), &bad).unwrap();
    let o = audit(state.path(), &["migrate", "--key", p(&key_path)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not migrating"), "{}", stderr(&o));
    std::fs::write(dir.join("seg-00000001.log"), &seg).unwrap();
    // Migrated: the old log kept aside (still verifiable), the new one records where it ended.
    let o = audit(state.path(), &["migrate", "--key", p(&key_path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let archive = std::fs::read_dir(state.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit-v1-")
        })
        .expect("the old log is kept");
    let o = securerun(&[
        "audit",
        "verify",
        "--dir",
        p(&archive),
        "--key",
        p(&key_path),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let migrated = export_local(state.path())
        .into_iter()
        .find(|r| r["event"] == "audit_migrated")
        .expect("the migration is recorded");
    assert_eq!(migrated["count"], 3);
    assert!(migrated["detail"]
        .as_str()
        .unwrap()
        .contains(&hex::encode(head)));
    serve(state.path(), None).unwrap().stop();
    verify_ok(state.path());
}

/// The spool takes only what the state directory's owner left there, marks it as spooled, and
/// bounds its time by the file's age; a spool that is a link is refused.
#[test]
fn the_spool_accepts_only_the_owners_files_and_bounds_their_time() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    token(state.path(), "t", "embeddings");
    let spool = state.path().join("audit/spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut backdated = securerun::audit::AuditRecord::event("token_revoked");
    backdated.time_ms = 1;
    std::fs::write(
        spool.join("0000000000000001-aa.json"),
        serde_json::to_vec(&backdated).unwrap(),
    )
    .unwrap();
    let foreign = spool.join("0000000000000002-bb.json");
    std::fs::write(&foreign, serde_json::to_vec(&backdated).unwrap()).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let started = securerun::audit::now_ms();
    serve(state.path(), None).unwrap().stop();
    let records = export_local(state.path());
    let taken = records
        .iter()
        .find(|r| r["event"] == "token_revoked")
        .expect("the owner's spooled record");
    assert_eq!(taken["spooled"], true);
    assert!(
        taken["time_ms"].as_u64().unwrap() + 120_000 >= started,
        "{taken}"
    );
    assert!(taken["detail"].as_str().unwrap().contains("bounded"));
    let invalid = records
        .iter()
        .find(|r| r["event"] == "spool_invalid")
        .expect("the foreign file is reported, not taken");
    assert!(
        invalid["detail"].as_str().unwrap().contains("owner"),
        "{invalid}"
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r["event"] == "token_revoked")
            .count(),
        1
    );
    // A spool replaced by a link elsewhere: the writer refuses to start.
    std::fs::remove_dir_all(&spool).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), &spool).unwrap();
    let err = serve(state.path(), None)
        .err()
        .expect("must not take a linked spool");
    assert!(err.contains("spool"), "{err}");
}
