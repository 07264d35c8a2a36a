//! Serving throughput and latency on loopback (run `scripts/fetch-models.sh` first): a real
//! `securerun serve` (confined worker) and concurrent keep-alive HTTP/1.1 clients (hyper).
//! Measures requests/s and p50/p99 for `/healthz` (no auth), `/v1/models` (auth + limits, no
//! model work: the per-request overhead of the security layers), short embeddings and short
//! completions.
//!
//!     cargo bench --bench serve
//!
//! No assertions: numbers go to docs/benchmarks.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_securerun")
}

fn serve(model: &Path, state: &Path, audit_sync: &str) -> Server {
    let mut child = Command::new(bin())
        .args([
            "serve",
            model.to_str().unwrap(),
            "--allow-unsigned",
            "--listen",
            "127.0.0.1:0",
            "--audit-sync",
            audit_sync,
        ])
        .args(["--state-dir", state.to_str().unwrap()])
        .env("SECURERUN_LOG", "warn")
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
    Server(child, addr)
}

/// `clients` connections, each sending `per_client` requests back to back; latencies in ms.
async fn load(
    addr: &str,
    clients: usize,
    per_client: usize,
    path: &'static str,
    token: &str,
    body: Option<String>,
) -> (f64, Vec<f64>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (addr, token, body) = (addr.to_string(), token.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::new();
            for _ in 0..per_client {
                let req = hyper::Request::builder()
                    .method(if body.is_some() { "POST" } else { "GET" })
                    .uri(path)
                    .header("host", "localhost")
                    .header("authorization", format!("Bearer {token}"))
                    .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
                    .unwrap();
                let t = Instant::now();
                let resp = sender.send_request(req).await.unwrap();
                assert!(resp.status().is_success(), "{}", resp.status());
                resp.into_body().collect().await.unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all.len() as f64 / started.elapsed().as_secs_f64(), all)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 0 };
    let models = std::env::var_os("SECURERUN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"));
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args([
            "token",
            "create",
            "--name",
            "bench",
            "--scopes",
            "inference,embeddings",
        ])
        .args(["--rate", "1000000/min", "--tokens-per-min", "100000000"])
        .args(["--state-dir", state.path().to_str().unwrap()])
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let mut run = |label: &str,
                   addr: &str,
                   clients: usize,
                   n: usize,
                   path: &'static str,
                   body: Option<String>| {
        let (rps, mut lat) = rt.block_on(load(addr, clients, n, path, &token, body));
        rows.push(format!(
            "{label:<44} {clients:>3} clients  {rps:>8.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        ));
    };
    for sync in ["buffered", "fsync"] {
        let enc = serve(&models.join("all-minilm-l6-v2"), state.path(), sync);
        let label = format!("GET /healthz (audit {sync})");
        run(&label, &enc.1, 8, 2 + 998 * scale, "/healthz", None);
        let label = format!("GET /v1/models (auth+limits, audit {sync})");
        run(&label, &enc.1, 8, 2 + 998 * scale, "/v1/models", None);
    }
    let enc = serve(&models.join("all-minilm-l6-v2"), state.path(), "fsync");
    let embed = r#"{"model": "all-minilm-l6-v2", "input": "A man is eating food."}"#.to_string();
    run(
        "POST /v1/embeddings (1 sentence)",
        &enc.1,
        4,
        2 + 98 * scale,
        "/v1/embeddings",
        Some(embed),
    );
    drop(enc);
    let llm = serve(&models.join("smollm2-135m-instruct"), state.path(), "fsync");
    let complete = r#"{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}"#.to_string();
    run(
        "POST /v1/completions (4 tokens)",
        &llm.1,
        4,
        1 + 9 * scale,
        "/v1/completions",
        Some(complete),
    );
    drop(llm);
    for r in rows {
        println!("{r}");
    }
    // The audit writer alone: records/s with 8 concurrent appenders.
    for (label, durability) in [
        ("fsync", securerun::audit::Durability::Fsync),
        ("buffered", securerun::audit::Durability::Buffered),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = securerun::audit::AuditLog::open(dir.path(), durability).unwrap();
        let n = 200 + 4800 * scale;
        let started = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..n / 8 {
                        let mut r = securerun::audit::AuditRecord::event("request");
                        r.route = Some("GET /v1/models".into());
                        r.status = Some(200);
                        log.append_blocking(r).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        // Signed checkpoints (one per 1000 records) are part of the cost measured.
        let checkpoints = std::fs::read_to_string(dir.path().join("checkpoints.jsonl"))
            .map_or(0, |t| t.lines().count());
        println!(
            "audit writer, {label:<8} 8 appenders        {:>8.0} records/s  mean wait {:.3} ms  ({checkpoints} signed checkpoints)",
            n as f64 / secs,
            log.write_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e3 / n as f64
        );
    }
}
