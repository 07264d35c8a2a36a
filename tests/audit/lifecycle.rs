//! The server under a service manager: readiness against liveness, a confined worker that dies
//! between requests, SIGHUP swapping the TLS certificate (a bad one refused and recorded), and
//! systemd's readiness protocol (READY, RELOADING, STOPPING) on a real notify socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;

use crate::common::p;
use crate::harness::*;

/// Every process the server started (its confined workers), from each thread's children.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    out
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The log ends with `server_stop` and verifies, attested by a signed head to its last record;
/// returns its records.
fn assert_stopped_last_and_attested(state: &std::path::Path) -> Vec<serde_json::Value> {
    let records = export_local(state);
    let events: Vec<&str> = records.iter().filter_map(|r| r["event"].as_str()).collect();
    let stop = events.iter().rposition(|e| *e == "server_stop");
    assert_eq!(
        stop,
        Some(events.len() - 1),
        "records after server_stop: {:?}",
        &events[stop.map_or(0, |i| i + 1)..]
    );
    let verified = audit(state, &["verify", "--trust-local-key"]);
    let said = String::from_utf8_lossy(&verified.stdout).to_string()
        + &String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success(), "{said}");
    assert!(
        said.contains("; 0 records after it are not yet attested"),
        "{said}"
    );
    records
}

/// `/healthz` says the process answers; `/readyz` says whether requests can be served now. A
/// worker killed between requests is noticed and replaced without a request (recorded as
/// `worker_restarted`), and lockdown makes the server unready while it stays alive. Before,
/// there was no `/readyz` (404 without a token) and an idle worker's death went unseen until
/// the next request.
#[test]
fn readiness_follows_the_worker_and_lockdown_while_liveness_stays() {
    let state = tempfile::tempdir().unwrap();
    let admin = token(state.path(), "admin", "admin");
    let s = serve(state.path(), None).unwrap();
    let ready = |addr: &str| {
        let (status, body) = call_full(addr, "GET", "/readyz", None, "");
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        )
    };
    let (status, v) = ready(&s.addr);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "ready");
    assert_eq!(v["workers_up"], 1, "{v}");
    assert_eq!(
        v["models_unverified"], 1,
        "served with --allow-unsigned: {v}"
    );
    // Nothing about the models or tokens to an unauthenticated caller.
    assert!(!v.to_string().contains("minilm"), "{v}");

    // Kill the confined worker while nothing runs.
    let workers = children(s.child.id());
    assert_eq!(workers.len(), 1, "one confined worker: {workers:?}");
    // SAFETY: signalling a process this test's server started.
    unsafe { libc::kill(workers[0] as libc::pid_t, libc::SIGKILL) };
    wait_for("a replacement worker", || {
        let now = children(s.child.id());
        now.len() == 1 && now[0] != workers[0] && ready(&s.addr).1["workers_up"] == 1
    });
    assert_eq!(call(&s.addr, "GET", "/healthz", None, ""), 200);

    // Lockdown: alive, not ready.
    let on = call(
        &s.addr,
        "POST",
        "/admin/lockdown",
        Some(&admin),
        r#"{"on": true}"#,
    );
    assert_eq!(on, 200);
    let (status, v) = ready(&s.addr);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["reasons"][0], "in lockdown", "{v}");
    assert_eq!(call(&s.addr, "GET", "/healthz", None, ""), 200);
    s.stop();

    let restarted: Vec<_> = export_local(state.path())
        .into_iter()
        .filter(|r| r["event"] == "worker_restarted")
        .collect();
    assert_eq!(restarted.len(), 1, "{restarted:?}");
    let detail = restarted[0]["detail"].as_str().unwrap();
    assert!(detail.contains("SIGKILL"), "{detail}");
}

struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        Pki { ca }
    }

    /// A certificate for localhost: (PEM, key PEM, DER).
    fn leaf(&self) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// One HTTPS GET of `/healthz` on a fresh connection: the status line's code and the leaf
/// certificate the server presented.
fn tls_get(addr: &str, config: &Arc<rustls::ClientConfig>) -> Result<(u16, Vec<u8>), String> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    // The server closes after the answer (a TLS close_notify or not: the body is what counts).
    let _ = tls.read_to_end(&mut reply);
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or("no certificate")?;
    let text = String::from_utf8_lossy(&reply);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {text:?}"))?;
    Ok((code, leaf))
}

/// Messages the server sent to its notify socket so far.
fn notes(socket: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

/// SIGHUP re-reads the certificate and key: new connections get the new certificate while
/// clients keep calling without a single failure; a broken key is refused (recorded, the
/// running certificate stays); systemd hears READY, RELOADING (with its timestamp) and READY
/// again, then STOPPING at SIGTERM. Before, the certificate could only change with a restart,
/// and nothing spoke the notify protocol.
#[test]
fn sighup_swaps_the_tls_certificate_without_failing_a_request() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path();
    let (old_ca, new_ca) = (Pki::new("old CA"), Pki::new("new CA"));
    let (cert, key, old_der) = old_ca.leaf();
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_nonblocking(true).unwrap();
    let s = serve_env(
        dir,
        None,
        &["--tls-cert", p(&cert_path), "--tls-key", p(&key_path)],
        &[("NOTIFY_SOCKET", &socket_path)],
    )
    .unwrap();
    // READY follows the "listening" line.
    let mut heard = Vec::new();
    wait_for("READY=1", || {
        heard.extend(notes(&socket));
        heard.iter().any(|m| m.contains("READY=1"))
    });

    // Clients that trust both CAs call all along.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(old_ca.ca.der().clone()).unwrap();
    roots.add(new_ca.ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    assert_eq!(tls_get(&s.addr, &config).unwrap(), (200, old_der.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (addr, config, stop, calls) =
                (s.addr.clone(), config.clone(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (code, _) = tls_get(&addr, &config).expect("no request fails");
                    assert_eq!(code, 200);
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let (cert, key, new_der) = new_ca.leaf();
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGHUP) };
    wait_for("the new certificate", || {
        tls_get(&s.addr, &config).unwrap().1 == new_der
    });
    let before = calls.load(Ordering::Relaxed);
    wait_for("more calls after the swap", || {
        calls.load(Ordering::Relaxed) > before + 5
    });
    // READY again once the whole reload (models too) is done.
    wait_for("RELOADING=1 then READY=1", || {
        heard.extend(notes(&socket));
        let reloading = heard.iter().position(|m| m.contains("RELOADING=1"));
        reloading.is_some_and(|i| {
            heard[i].contains("MONOTONIC_USEC=")
                && heard[i + 1..].iter().any(|m| m.contains("READY=1"))
        })
    });

    // A key that does not match the certificate: refused, the running one stays.
    let (_, other_key, _) = new_ca.leaf();
    std::fs::write(&key_path, other_key).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGHUP) };
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tls_get(&s.addr, &config).unwrap().1, new_der);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("a client saw a failure");
    }
    s.stop();
    heard.extend(notes(&socket));
    assert!(heard.iter().any(|m| m.contains("STOPPING=1")), "{heard:?}");

    let fingerprint = |der: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(der))
    };
    let reloads: Vec<_> = export_local(dir)
        .into_iter()
        .filter(|r| r["event"] == "tls_reloaded")
        .collect();
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    assert_eq!(reloads[0]["outcome"], "ok");
    let detail = reloads[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&fingerprint(&new_der)) && detail.contains(&fingerprint(&old_der)),
        "{detail}"
    );
    assert_eq!(reloads[1]["outcome"], "refused", "{:?}", reloads[1]);
}

/// `--log-format json`: every line is one JSON object, and each request ends with one access
/// line (request id, route template, status, latency, token id, client pseudonym, model) that
/// carries neither the token's secret, the prompt, nor the raw path a client sent. Before,
/// logs were text only, with no status or latency per request.
#[test]
fn json_logs_have_one_access_line_per_request_and_no_secrets() {
    let state = tempfile::tempdir().unwrap();
    let user = token(state.path(), "user", "embeddings");
    let log = state.path().join("server.log");
    let s = serve_logging_with(state.path(), "info", &log, &["--log-format", "json"]);
    let secret_text = "my-private-diagnosis-47";
    let (status, _) = call_full(
        &s.addr,
        "POST",
        "/v1/embeddings",
        Some(&user),
        &embed_body(secret_text),
    );
    assert_eq!(status, 200);
    assert_eq!(
        call(
            &s.addr,
            "GET",
            "/v1/no-such-route/evil%22path",
            Some(&user),
            ""
        ),
        404
    );
    assert_eq!(
        call(&s.addr, "GET", "/v1/models", Some("sr_wrong"), ""),
        401
    );
    s.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let access: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["target"] == "access").collect();
    let find = |route: &str, status: u64| {
        access
            .iter()
            .find(|l| l["route"] == route && l["status"] == status)
            .unwrap_or_else(|| panic!("no access line for {route} {status}: {access:?}"))
    };
    let ok = find("/v1/embeddings", 200);
    assert_eq!(ok["model"], "all-minilm-l6-v2");
    assert!(ok["request_id"].as_str().unwrap().starts_with("req-"));
    assert!(ok["latency_ms"].is_u64() && ok["client"].as_str().unwrap().len() > 8);
    // The token's id (as in `token list`), never its secret.
    let id = ok["token"].as_str().unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{ok}"
    );
    find("other", 404);
    find("/v1/models", 401);
    for leak in [
        user.as_str(),
        secret_text,
        "evil",
        "sr_wrong",
        "INJECTEDMETHOD",
    ] {
        assert!(!text.contains(leak), "{leak:?} in the log");
    }
}

/// Every record of a mixed session reaches the SIEM streams while the read key is off the
/// host: a datagram socket taking JSON lines, a syslog socket taking OCSF, and a file taking
/// only the fields the site chose (content among them, by name). The auditor's own export
/// (with the read key, elsewhere) holds the same records. `audit export --format ocsf` gives
/// the same OCSF events. Before, only signed checkpoints left the host, and live monitoring
/// needed the read key on it.
#[test]
fn a_siem_stream_receives_every_record_while_the_read_key_is_off_the_host() {
    let state = tempfile::tempdir().unwrap();
    let user = token(state.path(), "analyst", "embeddings");
    let admin = token(state.path(), "admin", "admin");
    let auditor = Auditor::take(state.path());
    assert!(!state.path().join("audit/read.key").exists());
    let siem = tempfile::tempdir().unwrap();
    let (jsonl_path, syslog_path, file) = (
        siem.path().join("vector.sock"),
        siem.path().join("log.sock"),
        siem.path().join("chosen.jsonl"),
    );
    let jsonl = UnixDatagram::bind(&jsonl_path).unwrap();
    let syslog = UnixDatagram::bind(&syslog_path).unwrap();
    for s in [&jsonl, &syslog] {
        s.set_nonblocking(true).unwrap();
    }
    let streams = [
        format!("unix:{}", jsonl_path.display()),
        format!("syslog:{},format=ocsf", syslog_path.display()),
        format!("file:{},fields=time_ms+event+outcome", file.display()),
    ];
    let mut extra = Vec::new();
    for s in &streams {
        extra.extend(["--audit-stream", s.as_str()]);
    }
    let s = serve_with(state.path(), None, &extra).unwrap();
    let body = embed_body("hello");
    assert_eq!(
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body),
        200
    );
    assert_eq!(call(&s.addr, "POST", "/v1/embeddings", None, &body), 401);
    assert_eq!(call(&s.addr, "GET", "/metrics", Some(&user), ""), 403);
    let created = call(
        &s.addr,
        "POST",
        "/admin/tokens",
        Some(&admin),
        r#"{"name": "late", "scopes": ["embeddings"]}"#,
    );
    assert!(created == 200 || created == 201, "{created}");
    s.stop();

    let drain = |socket: &UnixDatagram| {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    };
    let streamed: Vec<serde_json::Value> = drain(&jsonl)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // What the auditor reads with the key: the records this server wrote (from its start).
    let exported = auditor.export(state.path(), &[]);
    let first = streamed.first().expect("records streamed");
    let from = exported
        .iter()
        .position(|r| r["time_ms"] == first["time_ms"] && r["event"] == first["event"])
        .expect("the first streamed record is in the log");
    let logged: Vec<serde_json::Value> = exported[from..]
        .iter()
        .map(|r| {
            let mut r = r.clone();
            for k in ["seq", "time", "attested"] {
                r.as_object_mut().unwrap().remove(k);
            }
            r
        })
        .collect();
    assert_eq!(streamed, logged, "the stream is the log, record for record");
    let events: Vec<&str> = streamed
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    for e in ["server_start", "request", "token_created", "server_stop"] {
        assert!(events.contains(&e), "{e} not streamed: {events:?}");
    }

    let ocsf = drain(&syslog);
    assert_eq!(ocsf.len(), streamed.len());
    for line in &ocsf {
        assert!(
            line.starts_with("<110>1 ") && line.contains(" audit-record - {"),
            "{line}"
        );
        let event: serde_json::Value =
            serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
        assert_eq!(event["class_uid"], 6003, "{event}");
    }
    let chosen = std::fs::read_to_string(&file).unwrap();
    assert_eq!(chosen.lines().count(), streamed.len());
    for line in chosen.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        keys.sort();
        assert!(
            keys.iter()
                .all(|k| ["event", "outcome", "time_ms"].contains(&k.as_str())),
            "{line}"
        );
    }

    // The batch export in OCSF, by the auditor.
    let mut args = vec!["export", "--format", "ocsf"];
    args.extend(auditor.full());
    let o = audit(state.path(), &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let batch: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(batch.len(), exported.len());
    assert!(batch
        .iter()
        .all(|e| e["class_uid"] == 6003 && e["time"].is_u64()));
    let refused = batch
        .iter()
        .find(|e| e["status_code"] == "401")
        .expect("the refusal, in OCSF");
    assert_eq!(refused["status"], "Failure");
}

/// `trust add` on a fresh host does not create the audit log (which would put a read key on
/// the host before the operator could create the log for an auditor's key): its record waits
/// in the spool, and the log created later for the auditor holds it. Before, `trust add`
/// created the log, read key and all.
#[test]
fn trust_add_does_not_create_the_audit_log_and_its_record_is_kept() {
    let state = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let prefix = keys.path().join("site");
    let o = crate::common::securerun(&["keygen", "--out", p(&prefix)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let public = keys.path().join("site.pub");
    let o = crate::common::securerun(&["trust", "add", p(&public), "--state-dir", p(state.path())]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let audit_dir = state.path().join("audit");
    assert!(!audit_dir.join("read.key").exists());
    assert!(!audit_dir.join("current.key").exists());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("created the audit log"));

    // The auditor's log, created afterwards: no read key on the host, the trust record in it.
    let auditor_dir = tempfile::tempdir().unwrap();
    let read_key = auditor_dir.path().join("read.key");
    let o = crate::common::securerun(&["audit", "keygen", "--out", p(&read_key)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recipient = auditor_dir.path().join("recipient.pub");
    std::fs::write(&recipient, &o.stdout).unwrap();
    let o = audit(state.path(), &["init", "--recipient", p(&recipient)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!audit_dir.join("read.key").exists());
    token(state.path(), "user", "embeddings");
    let o = audit(
        state.path(),
        &[
            "export",
            "--key",
            p(&read_key),
            "--public",
            p(&audit_dir.join("audit.pub")),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let added = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == "trust_key_added")
        .unwrap_or_else(|| panic!("no trust_key_added record: {out}"));
    assert_eq!(added["spooled"], true, "{added}");
}

/// SIGHUP re-reads the config file: settings read per request apply at once, recorded first
/// (`config_reloaded`, the keys that changed); a file that does not parse, or that changes a
/// key only a restart can apply, is refused whole (recorded, naming the line or the keys) and
/// the running settings stay. Before, a config change needed a restart.
#[test]
fn sighup_reloads_the_settings_and_refuses_a_bad_file_whole() {
    let state = tempfile::tempdir().unwrap();
    let user = token(state.path(), "user", "embeddings");
    let config = state.path().join("serve.toml");
    std::fs::write(&config, "max_embedding_inputs = 2\n").unwrap();
    let s = serve_with(state.path(), None, &["--config", p(&config)]).unwrap();
    let inputs = |n: usize| {
        let texts: Vec<String> = (0..n).map(|i| format!("text {i}")).collect();
        let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": texts}).to_string();
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body)
    };
    let hangup = || {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGHUP) };
    };
    assert_eq!(inputs(3), 400);
    std::fs::write(&config, "max_embedding_inputs = 4\n").unwrap();
    hangup();
    wait_for("the new limit", || inputs(3) == 200);
    assert_eq!(inputs(5), 400);
    // A restart-only key with a live one: nothing applies.
    std::fs::write(&config, "max_embedding_inputs = 8\nqueue = 3\n").unwrap();
    hangup();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(inputs(5), 400, "a partly applicable file changed something");
    // A file that does not parse.
    std::fs::write(&config, "max_embedding_inputs = \"many\"\n").unwrap();
    hangup();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(inputs(3), 200);
    s.stop();
    let reloads: Vec<serde_json::Value> = export_local(state.path())
        .into_iter()
        .filter(|r| r["event"] == "config_reloaded")
        .collect();
    assert_eq!(reloads.len(), 3, "{reloads:?}");
    assert_eq!(reloads[0]["outcome"], "ok");
    assert!(reloads[0]["detail"]
        .as_str()
        .unwrap()
        .contains("max_embedding_inputs"));
    assert_eq!(reloads[1]["outcome"], "refused");
    assert!(
        reloads[1]["detail"].as_str().unwrap().contains("queue"),
        "{:?}",
        reloads[1]
    );
    assert_eq!(reloads[2]["outcome"], "refused");
    let detail = reloads[2]["detail"].as_str().unwrap();
    assert!(
        detail.contains("line 1") && detail.contains("max_embedding_inputs"),
        "{detail}"
    );
}

/// A certificate path swapped for a FIFO, a device or a huge file is refused at once by the
/// reload (non-blocking open, regular files only, size cap): the server keeps answering, keeps
/// its certificate, and the next good reload still works. Before, a FIFO hung the reload (and
/// every later one) and a 3 GB file was read into memory while requests timed out.
#[test]
fn a_hostile_certificate_file_is_refused_at_once() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path();
    let ca = Pki::new("CA");
    let (cert, key, first) = ca.leaf();
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let s = serve_with(
        dir,
        None,
        &["--tls-cert", p(&cert_path), "--tls-key", p(&key_path)],
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca.der().clone()).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let hangup = || {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGHUP) };
    };
    let fifo = dir.join("fifo");
    let fifo_c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
    let huge = dir.join("huge.pem");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    for hostile in [&fifo, &huge, &std::path::PathBuf::from("/dev/zero")] {
        std::fs::remove_file(&cert_path).unwrap();
        std::os::unix::fs::symlink(hostile, &cert_path).unwrap();
        hangup();
        for _ in 0..10 {
            let started = Instant::now();
            assert_eq!(tls_get(&s.addr, &config).unwrap(), (200, first.clone()));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{hostile:?} stalled the server"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The next good pair still reloads.
    let (cert, key, second) = ca.leaf();
    std::fs::remove_file(&cert_path).unwrap();
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    hangup();
    wait_for("the good pair", || {
        tls_get(&s.addr, &config).unwrap().1 == second
    });
    s.stop();
    let outcomes: Vec<String> = export_local(dir)
        .into_iter()
        .filter(|r| r["event"] == "tls_reloaded")
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["refused", "refused", "refused", "ok"]);
}

/// Entries planted in the spool are each recorded once as `spool_invalid` and moved aside:
/// a directory (which could not be removed, and was recorded every second, forever), a file
/// not named like a record, and a well-formed record of an event no CLI command spools (a
/// forged `request`). Before, the directory flooded the log and the forged request was
/// accepted as spooled.
#[test]
fn planted_spool_entries_are_recorded_once_and_forged_events_refused() {
    let state = tempfile::tempdir().unwrap();
    token(state.path(), "user", "embeddings");
    let s = serve(state.path(), None).unwrap();
    let spool = state.path().join("audit/spool");
    std::fs::create_dir_all(spool.join("0000000000000001-planted.json")).unwrap();
    std::fs::write(spool.join("notes.txt"), "hello").unwrap();
    let forged = serde_json::json!({"time_ms": 1, "event": "request", "token_id": "feedfacefeedface",
                                    "route": "POST /v1/chat/completions", "status": 200});
    std::fs::write(
        spool.join("0000000000000002-forged.json"),
        forged.to_string(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    s.stop();
    let records = export_local(state.path());
    let invalid: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["event"] == "spool_invalid")
        .collect();
    assert_eq!(invalid.len(), 3, "{invalid:?}");
    assert!(!records.iter().any(|r| r["token_id"] == "feedfacefeedface"));
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(state.path().join("audit/spool-rejected"))
            .unwrap()
            .count(),
        3
    );
}

/// A SIGHUP that comes while the server is still starting (`kill -HUP` from an operator or a
/// script, a reload raced against start-up) is a reload once the server listens, never its
/// death: the handler is in place before the audit log, the worker or the listener. Before,
/// it was installed by a task spawned after "listening on" was printed, so a SIGHUP during
/// start-up (or right after the line, on a loaded machine) killed the server with the
/// signal's default action and reset every connection it had accepted.
#[test]
fn a_sighup_during_start_up_is_a_reload_not_a_kill() {
    use std::io::BufRead;
    let state = tempfile::tempdir().unwrap();
    let user = token(state.path(), "user", "embeddings");
    let config = state.path().join("serve.toml");
    std::fs::write(&config, "max_embedding_inputs = 2\n").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_securerun"))
        .args(["serve", p(&crate::common::minilm()), "--allow-unsigned"])
        .args(["--listen", "127.0.0.1:0", "--config", p(&config)])
        .args(["--state-dir", p(state.path())])
        .env("SECURERUN_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let listening = Arc::new(AtomicBool::new(false));
    let signals = AtomicUsize::new(0);
    let line = std::thread::scope(|scope| {
        scope.spawn(|| {
            // From the moment its first worker exists (the server is loading the model) until
            // it listens: a SIGHUP every 20 ms, the config changed after the first.
            while !listening.load(Ordering::SeqCst) {
                if !children(pid as u32).is_empty() {
                    // SAFETY: signalling our own child.
                    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
                        break;
                    }
                    if signals.fetch_add(1, Ordering::SeqCst) == 0 {
                        std::fs::write(&config, "max_embedding_inputs = 4\n").unwrap();
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut line = String::new();
        let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        listening.store(true, Ordering::SeqCst);
        line
    });
    assert!(
        signals.load(Ordering::SeqCst) > 0,
        "no SIGHUP was sent during start-up"
    );
    assert!(
        line.starts_with("listening on"),
        "the server died of a SIGHUP during start-up: {:?}",
        child.try_wait()
    );
    let url = line.split_whitespace().nth(2).unwrap();
    let s = Server {
        child,
        addr: url.split_once("://").map_or(url, |(_, a)| a).to_string(),
    };
    let texts = serde_json::json!({"model": "all-minilm-l6-v2", "input": ["a", "b", "c"]});
    // The reload asked for during start-up happens: the new limit applies.
    wait_for("the reloaded limit", || {
        call(
            &s.addr,
            "POST",
            "/v1/embeddings",
            Some(&user),
            &texts.to_string(),
        ) == 200
    });
    s.stop();
    let reloads = export_local(state.path())
        .into_iter()
        .filter(|r| r["event"] == "config_reloaded" && r["outcome"] == "ok")
        .count();
    assert_eq!(reloads, 1);
}

/// A SIGHUP, SIGINT or SIGTERM that reaches the confined worker (a signal to the server's
/// whole process group: a closed terminal, Ctrl-C, `kill -TERM -PGID`, `systemctl kill -s
/// HUP`) leaves it alone: the supervisor reloads or drains and ends its workers itself
/// (SIGKILL). Before, the worker died of each (the default action): the generation it was
/// serving failed with `worker_failed`, or a misleading `worker_restarted` was recorded. (Sent to the worker alone here: the server's own SIGHUP starts a reload
/// that replaces the worker anyway.)
#[test]
fn signals_for_the_process_group_do_not_kill_the_worker() {
    let state = tempfile::tempdir().unwrap();
    let user = token(state.path(), "user", "embeddings");
    let s = serve(state.path(), None).unwrap();
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": ["a"]}).to_string();
    assert_eq!(
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body),
        200
    );
    let workers = children(s.child.id());
    assert_eq!(workers.len(), 1, "{workers:?}");
    for signal in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
        // SAFETY: signalling the server's own worker, a descendant of this test.
        assert_eq!(unsafe { libc::kill(workers[0] as libc::pid_t, signal) }, 0);
    }
    std::thread::sleep(Duration::from_secs(1));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", workers[0])).unwrap_or_default();
    let alive = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'));
    assert!(alive, "the worker died: {stat:?}");
    assert_eq!(
        call(&s.addr, "POST", "/v1/embeddings", Some(&user), &body),
        200
    );
    assert_eq!(children(s.child.id()), workers, "the worker was replaced");
    s.stop();
}

/// A shutdown that comes while a SIGHUP's reload is starting new workers waits for it (or
/// stops it before its next record): `server_stop` is the last record, and the whole log is
/// attested by the final checkpoint. Before, the reload's `sandbox_started` and
/// `model_replaced` could land after `server_stop`, outside every checkpoint.
#[test]
fn a_shutdown_during_a_reload_leaves_server_stop_last() {
    for _ in 0..3 {
        let state = tempfile::tempdir().unwrap();
        let s = serve(state.path(), None).unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGHUP) };
        s.stop();
        assert_stopped_last_and_attested(state.path());
    }
}

/// A SIGTERM while the server starts (a `systemctl stop` or a restart racing a slow model
/// load) is an orderly stop at the next step: exit 0, `server_stop` recorded as stopped during
/// start-up, the log attested to its end. Before, the signal's default action killed the
/// server (exit 143) and the log ended at `model_verification`, unattested.
#[test]
fn a_sigterm_during_start_up_stops_in_order() {
    use std::io::Read;
    let state = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_securerun"))
        .args(["serve", p(&crate::common::minilm()), "--allow-unsigned"])
        .args(["--listen", "127.0.0.1:0", "--state-dir", p(state.path())])
        .env("SECURERUN_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The first worker exists: the model is loading.
    let deadline = Instant::now() + Duration::from_secs(20);
    while children(child.id()).is_empty() {
        assert!(Instant::now() < deadline, "no worker started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!out.contains("listening on"), "it started anyway: {out}");
    let records = assert_stopped_last_and_attested(state.path());
    let last = records.last().unwrap();
    assert!(
        last["detail"].as_str().unwrap().contains("start-up"),
        "{last}"
    );
}

/// Operator actions spooled by CLI commands while the server stops (a `token revoke` racing a
/// `systemctl stop`; here thousands, to make the race certain) are recorded before
/// `server_stop` or left in the spool for the next start, never after it: the final checkpoint
/// attests the whole log. Before, the token reloader went on ingesting the spool through the
/// shutdown, and records landed after `server_stop` and the last checkpoint.
#[test]
fn spooled_actions_during_a_shutdown_never_follow_server_stop() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let s = serve(state.path(), None).unwrap();
    let spool = state.path().join("audit/spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 0..6000u64 {
        let record = serde_json::json!({"time_ms": now, "event": "lockdown_off"});
        let name = format!("{:016}-{i:016x}.json", now);
        std::fs::write(spool.join(name), record.to_string()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    s.stop();
    assert_stopped_last_and_attested(state.path());
}
