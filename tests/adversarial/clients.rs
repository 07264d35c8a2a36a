//! Hostile and slow clients: stalled streams (HTTP/1.1 and HTTP/2), idle-connection floods,
//! oversized and slow requests, anonymous floods, shared addresses, revocation mid-stream.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::common;
use super::harness::*;

const FAST: &str = "idle_timeout = 2\nsend_timeout = 2\nbody_timeout = 4\nheader_timeout = 2\n";

/// HTTP/2 with a flow-control window of zero: the server can send nothing. The stream must be
/// cut off after `send_timeout`, its generation cancelled, and the next request served. Before
/// the fix the SSE task waited forever, its channel filled, then the engine thread blocked in
/// `blocking_send`, and every later request hung.
#[test]
fn a_stalled_http2_stream_cannot_hold_the_engine() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::smollm2(), state.path(), FAST, &[]);
    let t = s.token("c", &["--scopes", "inference"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = s.addr;
    let token = t.clone();
    let stalled = std::thread::spawn(move || {
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .initial_stream_window_size(0)
                    .initial_connection_window_size(0)
                    .handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let body = completion(LONG_PROMPT, 2000, true);
            let req = hyper::Request::post(format!("http://{addr}/v1/completions"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            // Never read the body: hold the window at zero for a long time.
            tokio::time::sleep(Duration::from_secs(40)).await;
            drop(resp);
        })
    });
    std::thread::sleep(Duration::from_secs(8));
    let started = Instant::now();
    let (status, body) = call(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&t),
        &completion("The capital of France is", 3, false),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    s.stop_after(|records| {
        let stream = records
            .iter()
            .find(|r| {
                r["event"] == "request"
                    && r["route"] == "POST /v1/completions"
                    && r["outcome"] != "ok"
            })
            .expect("the stalled stream has its record");
        assert_eq!(stream["outcome"], "send_timeout", "{stream}");
    });
    let _ = stalled;
}

/// HTTP/1.1: a client that reads nothing. A fast (fake) worker fills every buffer on the way;
/// the stream must end within `send_timeout`, be recorded as not delivered, and the connection
/// be cut. Before the fix it was recorded as a finished stream and the connection stayed open.
#[test]
fn a_stalled_http1_stream_is_cut_and_recorded_as_undelivered() {
    let state = tempfile::tempdir().unwrap();
    let worker = fake_worker(
        state.path(),
        "fast",
        "while True:\n    r = read()\n    if r['type'] != 'generate': continue\n    n = r['params']['max_tokens']\n    \
         for i in range(n): msg({'type': 'text', 'id': r['id'], 'text': 'x' * 60})\n    \
         msg({'type': 'done', 'id': r['id'], 'finish_reason': 'Length', 'prompt_tokens': len(r['prompt_ids']), 'token_ids': [1] * n, 'prefill_us': 1, 'decode_us': 1})",
    );
    let s = Server::start(
        &common::smollm2(),
        state.path(),
        FAST,
        &[("SECURERUN_TEST_WORKER_PROGRAM", worker.to_str().unwrap())],
    );
    let t = s.token(
        "c",
        &["--scopes", "inference,metrics", "--rate", "100000/min"],
    );
    let conn = {
        let sock = socket2_small_rcvbuf(s.addr);
        let mut conn = sock;
        let body = completion("hello", 4096, true);
        write!(
            conn,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        conn
    };
    // The connection is cut: reading what the kernel holds then hits EOF or a reset.
    assert!(
        eventually(Duration::from_secs(20), || metric(
            s.addr,
            &t,
            "responses_stalled_total"
        ) >= 1),
        "the stalled response was never cut off"
    );
    let (status, _) = call(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&t),
        &completion("hi", 2, false),
    );
    assert_eq!(status, 200);
    drop(conn);
    s.stop_after(|records| {
        let streamed: Vec<_> = records
            .iter()
            .filter(|r| r["event"] == "request" && r["completion_tokens"] == 4096)
            .collect();
        assert_eq!(streamed.len(), 1, "{records:?}");
        assert_eq!(streamed[0]["outcome"], "send_timeout", "{}", streamed[0]);
        assert!(
            streamed[0]["request_id"].is_string()
                && streamed[0]["token_id"].is_string()
                && streamed[0]["client"].is_string()
        );
    });
}

/// A socket with the smallest receive buffer the kernel allows, so a non-reading client stalls
/// the server quickly.
fn socket2_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

/// Opens a connection from another loopback address (127.0.0.2...).
fn connect_from(addr: SocketAddr, source: [u8; 4]) -> std::io::Result<TcpStream> {
    let sock = bound_socket(source)?;
    sock.connect(&addr.into())?;
    Ok(sock.into())
}

fn bound_socket(source: [u8; 4]) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((source, 0)).into())?;
    Ok(sock)
}

/// 2,000 idle connections from 16 addresses: each address gets at most its per-client share,
/// and once the global cap is reached new connections evict the longest-idle ones, so a valid
/// client that connects afresh is served every time; idle connections are closed after
/// `idle_timeout`, and service resumes by itself. Before the fix every connection was accepted
/// and kept, and a connection that sent nothing was never closed.
#[test]
fn two_thousand_idle_connections_do_not_starve_valid_clients() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(
        &common::minilm(),
        state.path(),
        &format!("{FAST}max_connections_per_client = 32\nmax_connections = 128\n"),
        &[],
    );
    let t = s.token(
        "c",
        &["--scopes", "embeddings,metrics", "--rate", "100000/min"],
    );
    // This test process needs 2,000 descriptors: raise its soft limit to the hard one.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let mut idle = Vec::new();
    for i in 0..2000u32 {
        // Sixteen attacking addresses: together four times the global cap.
        let src = [127, 0, 1, (i % 16) as u8 + 2];
        if let Ok(c) = connect_from(s.addr, src) {
            idle.push(c);
        }
    }
    assert!(
        idle.len() >= 1000,
        "only {} connections could be opened",
        idle.len()
    );
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "hello"}).to_string();
    for _ in 0..5 {
        // Right after the flood up to EVICTION_SLACK evicted connections may still be closing,
        // and a connection that arrives meanwhile is refused; a refused client retries and
        // must be served within a second.
        let status = (0..10)
            .find_map(|_| {
                let r = try_call(s.addr, "POST", "/v1/embeddings", Some(&t), &body).ok();
                if r.is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r
            })
            .map(|(status, _)| status);
        assert_eq!(status, Some(200));
    }
    assert!(metric(s.addr, &t, "connections_open") <= 128 + 64 + 2);
    // Every connection over the caps was refused on accept, evicted or, once idle, closed.
    assert!(eventually(Duration::from_secs(10), || {
        metric(s.addr, &t, "connections_refused_total")
            + metric(s.addr, &t, "connections_timed_out_total")
            >= idle.len() as u64 - 128
    }));
    // A connection that sends only part of a request line is closed after idle_timeout.
    let mut partial = TcpStream::connect(s.addr).unwrap();
    partial.write_all(b"POST /v1/embed").unwrap();
    let mut h2_partial = TcpStream::connect(s.addr).unwrap();
    h2_partial.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    for c in [&mut partial, &mut h2_partial] {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(eventually(Duration::from_secs(10), || metric(
        s.addr,
        &t,
        "connections_open"
    ) <= 2));
    drop(idle);
    s.stop();
}

/// Request heads are capped (431 in the API's error shape) before anything is recorded at
/// length; recorded paths are bounded; bodies are capped in size (413, API shape) and rate
/// (408); an anonymous flood from one address adds a bounded number of records and every
/// refusal is still accounted for (one by one, or counted in `refused_summary`).
#[test]
fn an_anonymous_flood_cannot_fill_the_disk_through_the_audit_log() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), FAST, &[]);
    let t = s.token(
        "c",
        &["--scopes", "embeddings,metrics", "--rate", "100000/min"],
    );
    let long_path = format!("/{}", "a".repeat(6000));
    let (status, body) = call(s.addr, "GET", &long_path, None, "");
    assert_eq!(status, 401, "{body}");
    let huge_header = format!("x-junk: {}\r\n", "b".repeat(20_000));
    let mut conn = TcpStream::connect(s.addr).unwrap();
    write!(
        conn,
        "GET /v1/models HTTP/1.1\r\nhost: x\r\n{huge_header}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    let (status, body) = parse(&out);
    assert_eq!(status, 431, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["code"],
        "header_too_large"
    );
    let (status, body) = call(
        s.addr,
        "POST",
        "/v1/embeddings",
        Some(&t),
        &"x".repeat(2 << 20),
    );
    assert_eq!(status, 413);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["type"],
        "invalid_request_error"
    );
    // A body that trickles in is refused (408) within body_timeout.
    let mut slow = TcpStream::connect(s.addr).unwrap();
    write!(slow, "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\ncontent-length: 100000\r\n\r\n").unwrap();
    let started = Instant::now();
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        let _ = slow.write_all(b"x");
        let mut buf = [0u8; 4096];
        if let Ok(n) = slow.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
            if n == 0 || got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    }
    assert_eq!(parse(&got).0, 408, "{}", String::from_utf8_lossy(&got));

    let audit_dir = state.path().join("audit");
    let before = dir_bytes(&audit_dir);
    let n = 3000;
    let flood_started = Instant::now();
    for _ in 0..n {
        let (status, _) = call(s.addr, "GET", &long_path, Some("srt_guess"), "");
        assert!(status == 401 || status == 429);
    }
    let secs = flood_started.elapsed().as_secs_f64().max(1.0);
    let grown = dir_bytes(&audit_dir) - before;
    assert!(
        (grown as f64) / secs < 8.0 * 1024.0,
        "{grown} bytes of audit log in {secs:.1} s from one address"
    );
    s.stop_after(|records| {
        let one_by_one = records
            .iter()
            .filter(|r| {
                r["event"] == "request"
                    && r["token_id"].is_null()
                    && r["status"].as_u64().is_some_and(|s| s == 401 || s == 429)
            })
            .count() as u64;
        let counted: u64 = records
            .iter()
            .filter(|r| r["event"] == "refused_summary")
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        // The flood, plus the 401 for the long path, all accounted for.
        assert_eq!(one_by_one + counted, n + 1, "{one_by_one} + {counted}");
        for r in records.iter().filter(|r| r["event"] == "request") {
            assert!(r["route"].as_str().unwrap().len() < 400, "{r}");
        }
    });
}

/// Revoking a token ends its running stream within a second, with a final SSE error event;
/// before the fix the stream ran to its end.
#[test]
fn revocation_and_lockdown_end_running_streams() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::smollm2(), state.path(), FAST, &[]);
    let t = s.token("victim", &["--scopes", "inference"]);
    for (name, action) in [
        ("revoke", vec!["token", "revoke", "victim"]),
        ("lockdown", vec!["lockdown", "on", "--reason", "drill"]),
    ] {
        let t = if name == "lockdown" {
            s.token("second", &["--scopes", "inference"])
        } else {
            t.clone()
        };
        let mut conn = send(
            s.addr,
            "POST",
            "/v1/completions",
            Some(&t),
            &completion(LONG_PROMPT, 2000, true),
        );
        let mut first = [0u8; 256];
        conn.read_exact(&mut first).unwrap();
        let mut args = action.clone();
        args.extend(["--state-dir", common::p(&s.state)]);
        assert!(common::securerun(&args).status.success());
        let cut = Instant::now();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        assert!(
            cut.elapsed() < Duration::from_secs(3),
            "{name}: {:?}",
            cut.elapsed()
        );
        let text = String::from_utf8_lossy(&rest);
        let code = if name == "lockdown" {
            "lockdown"
        } else {
            "token_revoked"
        };
        assert!(
            text.contains(&format!("\"code\":\"{code}\"")),
            "{name}: {text}"
        );
    }
    let mut off = vec!["lockdown", "off"];
    off.extend(["--state-dir", common::p(&s.state)]);
    assert!(common::securerun(&off).status.success());
    s.stop_after(|records| {
        for outcome in ["token_revoked", "lockdown"] {
            assert!(
                records
                    .iter()
                    .any(|r| r["event"] == "request" && r["outcome"] == outcome),
                "no request record with outcome {outcome}"
            );
        }
    });
}

/// The prompt counts against the token budget, embeddings count their input tokens, and
/// `usage` reports them. A request that alone exceeds the budget can never run: a 400
/// (`request_exceeds_budget`), not a 429 a client would retry forever; a spent budget is a 429.
#[test]
fn prompt_and_embedding_tokens_count_against_the_budget() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::smollm2(), state.path(), FAST, &[]);
    let t = s.token(
        "small",
        &["--scopes", "inference", "--tokens-per-min", "50"],
    );
    let long = "word ".repeat(200);
    let (status, body) = call(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&t),
        &completion(&long, 1, false),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("request_exceeds_budget"), "{body}");
    let (status, body) = call(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&t),
        &completion("The capital of France is", 2, false),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    // Seven tokens each: the budget of 50 is spent within eight.
    let spent = (0..8).any(|_| {
        call(
            s.addr,
            "POST",
            "/v1/completions",
            Some(&t),
            &completion("The capital of France is", 2, false),
        )
        .0 == 429
    });
    assert!(spent);
    s.stop();

    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), FAST, &[]);
    let t = s.token("e", &["--scopes", "embeddings", "--tokens-per-min", "40"]);
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": ["A man is eating food.", "hello"]}).to_string();
    let (status, out) = call(s.addr, "POST", "/v1/embeddings", Some(&t), &body);
    assert_eq!(status, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 11, "{v}");
    let big =
        serde_json::json!({"model": "all-minilm-l6-v2", "input": "word ".repeat(60)}).to_string();
    assert_eq!(
        call(s.addr, "POST", "/v1/embeddings", Some(&t), &big).0,
        400
    );
    s.stop();
}

/// A token store that cannot be read or parsed never empties the server: the last good token
/// set stays, the error is counted, and no `token_revoked` record is written. Before the fix a
/// corrupt store refused every token and recorded each one as revoked.
#[test]
fn a_broken_token_store_keeps_the_last_good_tokens() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), FAST, &[]);
    let t = s.token(
        "c",
        &["--scopes", "embeddings,metrics", "--rate", "100000/min"],
    );
    let store = state.path().join("tokens.json");
    let good = std::fs::read(&store).unwrap();
    std::fs::write(&store, b"{ not json").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "hi"}).to_string();
    assert_eq!(
        call(s.addr, "POST", "/v1/embeddings", Some(&t), &body).0,
        200
    );
    assert!(metric(s.addr, &t, "token_store_errors_total") >= 1);
    std::fs::write(&store, good).unwrap();
    s.stop_after(|records| {
        assert!(
            !records.iter().any(|r| r["event"] == "token_revoked"),
            "{records:?}"
        );
    });
}

/// Small ones: `bearer` in any case; token names without bidi/format controls; no secret hash
/// over the admin API; `expires_in` overflow refused.
#[test]
fn small_hardening() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), FAST, &[]);
    let admin = s.token("admin", &["--scopes", "admin,embeddings"]);
    let mut conn = TcpStream::connect(s.addr).unwrap();
    write!(conn, "GET /admin/tokens HTTP/1.1\r\nhost: x\r\nauthorization: bEaReR {admin}\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    conn.read_to_end(&mut out).unwrap();
    let (status, body) = parse(&out);
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("secret_sha256"), "{body}");
    let create = |name: &str, expires: Option<u64>| {
        let mut v = serde_json::json!({"name": name, "scopes": ["inference"]});
        if let Some(e) = expires {
            v["expires_in"] = e.into();
        }
        call(
            s.addr,
            "POST",
            "/admin/tokens",
            Some(&admin),
            &v.to_string(),
        )
    };
    assert_eq!(create("evil\u{202e}txt.exe", None).0, 400);
    assert_eq!(create("zero\u{200b}width", None).0, 400);
    assert_eq!(create("ok", Some(u64::MAX)).0, 400);
    let (status, body) = create("fine", Some(3600));
    assert_eq!(status, 201, "{body}");
    assert!(!body.contains("secret_sha256"));
    s.stop();
}

/// Behind a trusted proxy, the forwarded address is the client: one guesser behind the proxy is
/// locked out without locking out the proxy's other clients; from anyone else the header is
/// ignored (a client cannot pick a fresh identity per request to dodge its lockout).
#[test]
fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(
        &common::minilm(),
        state.path(),
        &format!("{FAST}trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_client = 16\n"),
        &[],
    );
    let forwarded = |xff: &str, token: &str| {
        let mut c = TcpStream::connect(s.addr).unwrap();
        write!(c, "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-forwarded-for: {xff}\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        parse(&out).0
    };
    for _ in 0..12 {
        forwarded("203.0.113.7", "srt_nope");
    }
    assert_eq!(
        forwarded("203.0.113.7", "srt_nope"),
        429,
        "the guesser is locked out"
    );
    // The proxy itself is not held to the per-client connection cap (16 here).
    let held: Vec<_> = (0..40)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        forwarded("203.0.113.8", "srt_nope"),
        401,
        "another client behind the proxy is not"
    );
    drop(held);
    s.stop();

    // Without trusted proxies, the header changes nothing: rotating it does not dodge a lockout.
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), FAST, &[]);
    let mut last = 0;
    for i in 0..14 {
        let mut c = TcpStream::connect(s.addr).unwrap();
        write!(c, "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 198.51.100.{i}\r\nauthorization: Bearer srt_nope\r\nconnection: close\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        last = parse(&out).0;
    }
    assert_eq!(last, 429);
    s.stop();
}

/// HTTP that the parser refuses never reaches a handler, and is still recorded.
#[test]
fn malformed_http_is_recorded() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), FAST, &[]);
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nbad header line without colon\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    assert_eq!(parse(&out).0, 400);
    s.stop_after(|records| {
        assert!(
            records
                .iter()
                .any(|r| r["event"] == "request" && r["outcome"] == "refused_malformed"),
            "{records:?}"
        );
    });
}

/// A token that expires while its stream runs: the stream ends within about a second of the
/// expiry with a final `token_expired` event.
#[test]
fn expiry_ends_a_running_stream() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::smollm2(), state.path(), FAST, &[]);
    let t = s.token("short", &["--scopes", "inference", "--expires", "6s"]);
    let mut conn = send(
        s.addr,
        "POST",
        "/v1/completions",
        Some(&t),
        &completion(LONG_PROMPT, 2000, true),
    );
    let mut first = [0u8; 256];
    conn.read_exact(&mut first).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("\"code\":\"token_expired\""), "{text}");
    s.stop();
}

/// `/healthz` needs no token, so it is where an anonymous flood goes once refusals are cheap:
/// it is sampled like refusals (bounded log growth) and every call is still accounted for.
#[test]
fn a_healthz_flood_is_sampled_and_counted() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(&common::minilm(), state.path(), FAST, &[]);
    let audit_dir = state.path().join("audit");
    let before = dir_bytes(&audit_dir);
    let n = 2000u64;
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(call(s.addr, "GET", "/healthz", None, "").0, 200);
    }
    let secs = started.elapsed().as_secs_f64().max(1.0);
    let grown = dir_bytes(&audit_dir) - before;
    assert!(
        (grown as f64) / secs < 8.0 * 1024.0,
        "{grown} bytes in {secs:.1} s"
    );
    s.stop_after(|records| {
        let one_by_one = records
            .iter()
            .filter(|r| r["event"] == "request" && r["route"] == "GET /healthz")
            .count() as u64;
        let counted: u64 = records
            .iter()
            .filter(|r| r["event"] == "refused_summary")
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        assert_eq!(one_by_one + counted, n);
    });
}

/// Jobs whose clients left give up their queue places: clients that submit and vanish cannot
/// keep the queue full (503) for everyone else. Before the fix they held their places until
/// the engine reached them.
#[test]
fn abandoned_jobs_do_not_hold_the_queue() {
    let state = tempfile::tempdir().unwrap();
    let worker = fake_worker(
        state.path(),
        "slow",
        "while True:\n    r = read()\n    if r['type'] != 'generate': continue\n    time.sleep(2)\n    \
         msg({'type': 'text', 'id': r['id'], 'text': 'a'})\n    \
         msg({'type': 'done', 'id': r['id'], 'finish_reason': 'Length', 'prompt_tokens': len(r['prompt_ids']), 'token_ids': [1], 'prefill_us': 1, 'decode_us': 1})",
    );
    let s = Server::start(
        &common::smollm2(),
        state.path(),
        &format!("{FAST}queue = 2\n"),
        &[("SECURERUN_TEST_WORKER_PROGRAM", worker.to_str().unwrap())],
    );
    let t = s.token("c", &["--scopes", "inference", "--rate", "100000/min"]);
    let body = completion("hello", 1, false);
    let running = {
        let (addr, t, body) = (s.addr, t.clone(), body.clone());
        std::thread::spawn(move || call(addr, "POST", "/v1/completions", Some(&t), &body).0)
    };
    std::thread::sleep(Duration::from_millis(300));
    // Two clients queue behind it, then leave.
    let leavers: Vec<_> = (0..2)
        .map(|_| send(s.addr, "POST", "/v1/completions", Some(&t), &body))
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    drop(leavers);
    std::thread::sleep(Duration::from_millis(200));
    let (status, out) = call(s.addr, "POST", "/v1/completions", Some(&t), &body);
    assert_eq!(status, 200, "{out}");
    assert_eq!(running.join().unwrap(), 200);
    s.stop();
}

/// Connections that keep an anonymous response "in flight" at no cost (an HTTP/2 window held
/// at zero) are evictable once stalled, so they cannot hold every slot either.
#[test]
fn zero_window_http2_connections_cannot_hold_every_slot() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(
        &common::minilm(),
        state.path(),
        &format!("{FAST}max_connections_per_client = 16\nmax_connections = 32\n"),
        &[],
    );
    let t = s.token("c", &["--scopes", "embeddings", "--rate", "100000/min"]);
    let addr = s.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut held = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..8u8 {
                        let Ok(sock) = bound_socket([127, 0, 2, i + 2]) else {
                            continue;
                        };
                        let _ = sock.set_nonblocking(true);
                        let _ = sock.connect(&addr.into());
                        let std_stream: TcpStream = sock.into();
                        let Ok(tcp) = tokio::net::TcpStream::from_std(std_stream) else {
                            continue;
                        };
                        let _ = tcp.writable().await;
                        let Ok((mut send, conn)) = hyper::client::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .initial_stream_window_size(0)
                        .initial_connection_window_size(0)
                        .handshake::<_, http_body_util::Empty<hyper::body::Bytes>>(
                            hyper_util::rt::TokioIo::new(tcp),
                        )
                        .await
                        else {
                            continue;
                        };
                        tokio::spawn(conn);
                        let req = hyper::Request::get(format!("http://{addr}/v1/models"))
                            .body(http_body_util::Empty::new())
                            .unwrap();
                        if let Ok(resp) = send.send_request(req).await {
                            held.push((send, resp));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(held);
            })
        })
    };
    std::thread::sleep(Duration::from_secs(4));
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "hello"}).to_string();
    let mut ok = 0;
    for _ in 0..6 {
        if call(s.addr, "POST", "/v1/embeddings", Some(&t), &body).0 == 200 {
            ok += 1;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    assert_eq!(
        ok, 6,
        "a valid client was starved by zero-window connections"
    );
    s.stop();
}

/// Low free space on the audit volume is reported before it runs out: with a threshold above
/// any real disk, the gauge says so.
#[test]
fn low_audit_disk_space_is_reported() {
    let state = tempfile::tempdir().unwrap();
    let s = Server::start(
        &common::minilm(),
        state.path(),
        &format!("{FAST}audit_min_free_mb = 1000000000\n"),
        &[],
    );
    let t = s.token("m", &["--scopes", "metrics"]);
    assert!(eventually(Duration::from_secs(10), || metric(
        s.addr,
        &t,
        "audit_disk_low"
    ) == 1));
    assert!(metric(s.addr, &t, "audit_free_bytes") > 0);
    s.stop();
}
