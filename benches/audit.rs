//! The audit writer alone: records/s with 8 concurrent appenders (group commit), the latency of
//! one durable append, and how long opening the log takes (a new epoch each time).
//!
//! The same source builds against older versions of the writer (`AuditLog::open` and
//! `append_blocking` are unchanged), so `benches/audit_compare.sh` runs an old and the new build
//! side by side, interleaved. Prints one JSON line.
//!
//! `cargo bench --bench audit -- [ROUNDS]`

use std::time::{Duration, Instant};

use securerun::audit::{AuditLog, AuditRecord, Durability};

fn record(i: u64) -> AuditRecord {
    let mut r = AuditRecord::event("request");
    r.request_id = Some(format!("req-{i:016x}"));
    r.token_id = Some("0123456789abcdef".into());
    r.client = Some("5f1d2c3b4a5968778695a4b3c2d1e0f1".into());
    r.model = Some("all-minilm-l6-v2".into());
    r.route = Some("/v1/embeddings".into());
    r.status = Some(200);
    r.outcome = Some("ok".into());
    r.latency_ms = Some(12);
    r.prompt_tokens = Some(9);
    r
}

fn throughput(durability: Durability, seconds: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&dir.path().join("audit"), durability).unwrap();
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < stop {
                    log.append_blocking(record(t * 1_000_000_000 + n)).unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    log.close().unwrap();
    total as f64 / seconds
}

fn latencies(n: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&dir.path().join("audit"), Durability::Fsync).unwrap();
    let mut us: Vec<f64> = (0..n)
        .map(|i| {
            let t = Instant::now();
            log.append_blocking(record(i as u64)).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    log.close().unwrap();
    us.sort_by(f64::total_cmp);
    (us[n / 2], us[n * 99 / 100])
}

fn open_ms(rounds: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let mut ms: Vec<f64> = (0..rounds)
        .map(|i| {
            let t = Instant::now();
            let log = AuditLog::open(&path, Durability::Fsync).unwrap();
            let took = t.elapsed().as_secs_f64() * 1e3;
            for j in 0..200 {
                log.append_blocking(record((i * 1000 + j) as u64)).unwrap();
            }
            log.close().unwrap();
            // The writer thread lets the lock go once it has finished.
            std::thread::sleep(Duration::from_millis(50));
            took
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[rounds / 2]
}

fn main() {
    let seconds: f64 = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(3.0);
    let fsync = throughput(Durability::Fsync, seconds);
    let buffered = throughput(Durability::Buffered, seconds);
    let (p50, p99) = latencies(500);
    let open = open_ms(9);
    println!(
        "{{\"records_per_s_fsync\": {fsync:.0}, \"records_per_s_buffered\": {buffered:.0}, \"append_us_p50\": {p50:.0}, \"append_us_p99\": {p99:.0}, \"open_ms\": {open:.1}}}"
    );
}
