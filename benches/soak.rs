//! Soak under hostile load (issue F): a real `securerun serve` (MiniLM, confined worker) and 64
//! concurrent clients for a while — valid embeddings clients, clients with bad tokens, clients
//! that trickle their bodies, clients that abort right after sending, and idle connections.
//! Reports requests served and refused by class, p50/p99 of valid requests, the server's peak
//! RSS and descriptors, and checks the audit log: `request` records plus counted refusals must
//! equal the requests sent, and `audit verify` must pass.
//!
//!     cargo bench --bench soak -- [SECONDS]      (default 60)
//!
//! No assertions on speed; the audit and crash checks exit non-zero.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_securerun")
}

fn models() -> PathBuf {
    std::env::var_os("SECURERUN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// Sends one request on a fresh connection and reads the status (0 if none).
fn request(addr: &str, token: &str, body: &str) -> u16 {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = write!(
        c,
        "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn proc_stats(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(60);
    let state = tempfile::tempdir().unwrap();
    let st = state.path().to_str().unwrap();
    let model = models().join("all-minilm-l6-v2");
    let token = |name: &str| -> String {
        let o = run(&[
            "token",
            "create",
            "--name",
            name,
            "--scopes",
            "embeddings",
            "--rate",
            "1000000/min",
            "--tokens-per-min",
            "100000000",
            "--state-dir",
            st,
        ]);
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    let valid = token("soak");
    let cfg = state.path().join("serve.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nidle_timeout = 5\nsend_timeout = 5\nbody_timeout = 10\nqueue = 64\nmax_connections_per_client = 4096\nmax_connections = 4096\n",
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args([
            "serve",
            model.to_str().unwrap(),
            "--allow-unsigned",
            "--state-dir",
            st,
        ])
        .args(["--config", cfg.to_str().unwrap()])
        .env("SECURERUN_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let pid = child.id();
    let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": "A man is eating food."})
        .to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let statuses: Arc<Mutex<BTreeMap<(String, u16), u64>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut threads = Vec::new();
    let classes = [
        ("valid", 32),
        ("invalid", 12),
        ("slow", 8),
        ("abort", 8),
        ("idle", 4),
    ];
    for (class, n) in classes {
        for _ in 0..n {
            let (addr, valid, body) = (addr.clone(), valid.clone(), body.clone());
            let (stop, sent, statuses, latencies) = (
                stop.clone(),
                sent.clone(),
                statuses.clone(),
                latencies.clone(),
            );
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let status = match class {
                        "valid" => {
                            let t = Instant::now();
                            sent.fetch_add(1, Ordering::Relaxed);
                            let s = request(&addr, &valid, &body);
                            if s == 200 {
                                latencies.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3);
                            }
                            s
                        }
                        "invalid" => {
                            sent.fetch_add(1, Ordering::Relaxed);
                            request(&addr, "srt_0000000000000000_guess_00000000", &body)
                        }
                        "slow" => {
                            // A valid head, then a body at a few bytes per second.
                            let Ok(mut c) = TcpStream::connect(&addr) else { continue };
                            sent.fetch_add(1, Ordering::Relaxed);
                            let _ = write!(c, "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {valid}\r\ncontent-length: 100000\r\n\r\n");
                            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
                            let mut buf = [0u8; 512];
                            let mut status = 0;
                            for _ in 0..60 {
                                if c.write_all(b"xx").is_err() { break; }
                                if let Ok(n) = c.read(&mut buf) {
                                    status = String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                                    break;
                                }
                            }
                            status
                        }
                        "abort" => {
                            let Ok(mut c) = TcpStream::connect(&addr) else { continue };
                            sent.fetch_add(1, Ordering::Relaxed);
                            let _ = write!(c, "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {valid}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            drop(c);
                            std::thread::sleep(Duration::from_millis(50));
                            499
                        }
                        _ => {
                            let c = TcpStream::connect(&addr);
                            std::thread::sleep(Duration::from_secs(2));
                            drop(c);
                            continue;
                        }
                    };
                    *statuses.lock().unwrap().entry((class.to_string(), status)).or_insert(0) += 1;
                }
            }));
        }
    }
    let started = Instant::now();
    let (mut peak_rss, mut peak_fds) = (0, 0);
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500));
        let (rss, fds) = proc_stats(pid);
        peak_rss = peak_rss.max(rss);
        peak_fds = peak_fds.max(fds);
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("the server exited during the soak: {status:?}");
            std::process::exit(1);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let exit = child.wait().unwrap();
    let verify = run(&["audit", "verify", "--trust-local-key", "--state-dir", st]);
    let export = run(&[
        "audit",
        "export",
        "--format",
        "jsonl",
        "--trust-local-key",
        "--state-dir",
        st,
    ]);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let one_by_one = records
        .iter()
        .filter(|r| r["event"] == "request" && r["route"] == "POST /v1/embeddings")
        .count() as u64;
    let counted: u64 = records
        .iter()
        .filter(|r| r["event"] == "refused_summary")
        .filter_map(|r| r["count"].as_u64())
        .sum();
    let all_requests = records.iter().filter(|r| r["event"] == "request").count() as u64;
    // The server's own count of requests it handed to the application (a client that closes
    // right after sending may be dropped by the HTTP layer before that: not a request).
    let dispatched: u64 = records
        .iter()
        .rev()
        .find(|r| r["event"] == "server_stop")
        .and_then(|r| {
            r["detail"]
                .as_str()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "soak: {secs} s, 64 clients (32 valid, 12 bad token, 8 slow body, 8 aborting, 4 idle)"
    );
    for ((class, status), n) in statuses.lock().unwrap().iter() {
        println!("  {class:<8} status {status:>3}: {n}");
    }
    println!(
        "  valid requests served: {} (p50 {:.1} ms, p99 {:.1} ms)",
        lat.len(),
        pct(0.5),
        pct(0.99)
    );
    println!(
        "  server peak RSS {} MiB, peak descriptors {peak_fds}",
        peak_rss / 1024
    );
    println!("  requests sent {sent} ({one_by_one} recorded one by one on the route)");
    println!(
        "  server: {dispatched} requests dispatched; audit: {all_requests} request records + {counted} counted in refused_summary = {}",
        all_requests + counted
    );
    println!(
        "  server exit: {exit:?}; audit verify: {}",
        if verify.status.success() {
            "ok"
        } else {
            "FAILED"
        }
    );
    if !exit.success() || !verify.status.success() || all_requests + counted != dispatched {
        std::process::exit(1);
    }
}
