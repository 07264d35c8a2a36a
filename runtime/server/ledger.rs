//! Exactly one audit record per request, whatever happens to it.
//!
//! The outermost middleware opens a [`Ledger`] entry for every request that reaches the
//! application. Whoever learns the request's fate writes the record: the middleware for an
//! ordinary response (before the response leaves), the stream task for a streamed one (when
//! the stream ends, with its final usage and whether the client got it all). If nobody does —
//! the client closed the connection, reset its HTTP/2 stream, or the server is going down —
//! dropping the last handle writes it with `client_closed` or `shutdown`. Taking the record out
//! of the entry is what makes it exactly one.
//!
//! Anonymous refusals are where a flood lands, so they pass through [`RefusalSampler`]: each
//! client address gets a few individual records per second, and the rest are counted into a
//! periodic `refused_summary` record, so the log grows by a bounded amount per attacking
//! address while every refusal is still accounted for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota};

use crate::audit::{AuditError, AuditLog, AuditRecord};

/// The longest route recorded; longer paths are cut (at a character boundary) and marked.
pub const MAX_RECORDED_PATH: usize = 256;

/// Individual records per second per client address for anonymous refusals (burst
/// [`REFUSAL_BURST`]); the rest go into `refused_summary`.
const REFUSALS_PER_SEC: u32 = 2;
const REFUSAL_BURST: u32 = 10;
/// Individual records per second for anonymous requests from all addresses together.
const REFUSALS_OVERALL: u32 = 50;
/// Distinct (client, outcome) counters kept between summaries; more are pooled as "other".
const MAX_SUMMARY_KEYS: usize = 4096;
/// Most `refused_summary` records per summary (the rest are pooled as "other").
const MAX_SUMMARY_RECORDS: usize = 64;
/// How often counted refusals are written out.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Cuts `path` to [`MAX_RECORDED_PATH`] bytes.
pub fn bounded_path(path: &str) -> String {
    bounded_text(path, MAX_RECORDED_PATH)
}

/// Cuts `text` to `max` bytes (at a character boundary), saying so.
pub fn bounded_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...(cut, {} bytes)", &text[..end], text.len())
}

/// Rate-limits individual records of anonymous refusals per client and counts the rest.
pub struct RefusalSampler {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// All addresses together: many addresses (an IPv6 range, a botnet) cannot multiply the
    /// log's growth without bound.
    overall: governor::DefaultDirectRateLimiter,
    counts: Mutex<HashMap<(String, String), u64>>,
    /// Refusals counted for summaries so far (for `/metrics`).
    pub summarized: AtomicU64,
}

impl Default for RefusalSampler {
    fn default() -> Self {
        let quota = Quota::per_second(NonZeroU32::new(REFUSALS_PER_SEC).expect("non-zero"))
            .allow_burst(NonZeroU32::new(REFUSAL_BURST).expect("non-zero"));
        let overall = Quota::per_second(NonZeroU32::new(REFUSALS_OVERALL).expect("non-zero"))
            .allow_burst(NonZeroU32::new(4 * REFUSALS_OVERALL).expect("non-zero"));
        RefusalSampler {
            limiter: governor::RateLimiter::keyed(quota),
            overall: governor::RateLimiter::direct(overall),
            counts: Mutex::default(),
            summarized: Default::default(),
        }
    }
}

impl RefusalSampler {
    /// Whether this refusal gets its own record; if not, it is counted for the next summary.
    pub fn admit(&self, ip: IpAddr, client: &str, outcome: &str) -> bool {
        let key = super::client::limit_key(ip);
        if self.limiter.check_key(&key).is_ok() && self.overall.check().is_ok() {
            if self.limiter.len() > 100_000 {
                self.limiter.retain_recent();
            }
            return true;
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let key = if counts.len() < MAX_SUMMARY_KEYS
            || counts.contains_key(&(client.to_string(), outcome.to_string()))
        {
            (client.to_string(), outcome.to_string())
        } else {
            ("other".to_string(), outcome.to_string())
        };
        *counts.entry(key).or_insert(0) += 1;
        self.summarized.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The counted refusals as `refused_summary` records, and resets them: one record per
    /// client for the [`MAX_SUMMARY_RECORDS`] busiest, one for all the others together, so a
    /// flood from many addresses costs a bounded number of writes.
    pub fn drain(&self) -> Vec<AuditRecord> {
        let counts = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        let mut by_client: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for ((client, outcome), n) in counts {
            by_client.entry(client).or_default().push((outcome, n));
        }
        if by_client.len() > MAX_SUMMARY_RECORDS {
            let mut clients: Vec<(String, u64)> = by_client
                .iter()
                .map(|(c, o)| (c.clone(), o.iter().map(|(_, n)| n).sum()))
                .collect();
            clients.sort_by_key(|c| std::cmp::Reverse(c.1));
            let mut others: HashMap<String, u64> = HashMap::new();
            for (client, _) in clients.into_iter().skip(MAX_SUMMARY_RECORDS) {
                for (outcome, n) in by_client.remove(&client).unwrap_or_default() {
                    *others.entry(outcome).or_insert(0) += n;
                }
            }
            by_client.entry("other".into()).or_default().extend(others);
        }
        by_client
            .into_iter()
            .map(|(client, mut outcomes)| {
                outcomes.sort();
                let total: u64 = outcomes.iter().map(|(_, n)| n).sum();
                let mut r = AuditRecord::event("refused_summary");
                r.client = Some(client);
                r.outcome = Some("refused_counted".into());
                r.detail = Some(format!(
                    "{total} refused requests not recorded one by one in the last {} s: {}",
                    SUMMARY_EVERY.as_secs(),
                    outcomes
                        .iter()
                        .map(|(o, n)| format!("{o} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                r.count = Some(total);
                r
            })
            .collect()
    }
}

/// What every request's ledger entry shares.
pub struct Ledgers {
    pub audit: AuditLog,
    /// Set when shutdown begins: records of requests dropped from then on say `shutdown`.
    pub shutting_down: AtomicBool,
    pub refusals: RefusalSampler,
    /// Request latency by route, status class and model, for `/metrics`.
    pub http: super::http_metrics::HttpMetrics,
    /// Key of the access log's client pseudonyms: random per server run, so plaintext log
    /// lines link a client's requests within a run but never to the (encrypted) audit log's
    /// pseudonyms or across restarts; the request id joins them for an auditor.
    log_key: [u8; 32],
    /// Entries whose record is not written yet (shutdown waits for them).
    pending: AtomicUsize,
}

impl Ledgers {
    pub fn new(audit: AuditLog) -> Arc<Self> {
        Arc::new(Ledgers {
            audit,
            shutting_down: AtomicBool::new(false),
            refusals: RefusalSampler::default(),
            http: Default::default(),
            log_key: {
                use rand_core::RngCore;
                let mut k = [0u8; 32];
                rand_core::OsRng.fill_bytes(&mut k);
                k
            },
            pending: AtomicUsize::new(0),
        })
    }

    /// A client address as the access log shows it (see `log_key`).
    fn log_pseudonym(&self, ip: IpAddr) -> String {
        use hmac::{Mac, SimpleHmac};
        let mut mac = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(&self.log_key)
            .expect("any key length");
        mac.update(ip.to_string().as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..12])
    }

    /// Waits up to `limit` for every open request record to be written.
    pub async fn settle(&self, limit: Duration) -> usize {
        let until = Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.pending.load(Ordering::Relaxed)
    }
}

/// One record on its way to the log; counted down when dropped.
struct Pending<'a>(&'a Ledgers);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Entry {
    request_id: String,
    record: Mutex<Option<AuditRecord>>,
    started: Instant,
    ip: IpAddr,
    book: Arc<Ledgers>,
}

/// A request's pending audit record (cheap to clone; all clones share it).
#[derive(Clone)]
pub struct Ledger(Arc<Entry>);

/// How a request ended, for its record.
pub struct Fate<'a> {
    pub status: Option<u16>,
    pub outcome: &'a str,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

impl Ledger {
    pub fn open(record: AuditRecord, ip: IpAddr, book: &Arc<Ledgers>) -> Self {
        book.pending.fetch_add(1, Ordering::Relaxed);
        Ledger(Arc::new(Entry {
            request_id: record.request_id.clone().unwrap_or_default(),
            record: Mutex::new(Some(record)),
            started: Instant::now(),
            ip,
            book: book.clone(),
        }))
    }

    pub fn request_id(&self) -> &str {
        &self.0.request_id
    }

    /// Changes the pending record (no effect once it is written).
    pub fn update(&self, f: impl FnOnce(&mut AuditRecord)) {
        if let Some(r) = self
            .0
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            f(r);
        }
    }

    /// A copy of the pending record (for a `stream_started` marker).
    pub fn snapshot(&self) -> Option<AuditRecord> {
        self.0
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Writes the record with its fate and waits until it is durable (or counted, for an
    /// anonymous refusal over its client's rate). Later calls do nothing.
    pub async fn finish(&self, fate: Fate<'_>) -> Result<(), AuditError> {
        let Some(record) = self.take(fate) else {
            return Ok(());
        };
        // Counted down even if this future is dropped mid-wait (the write itself completes on
        // its blocking thread either way).
        let _written = Pending(&self.0.book);
        self.0.book.audit.append(record).await
    }

    /// Takes the record out with its fate filled in; `None` if already written, or if it was
    /// counted for a summary instead.
    fn take(&self, fate: Fate<'_>) -> Option<AuditRecord> {
        let mut record = self
            .0
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        record.status = fate.status;
        if let (Some(status), Some(route)) = (fate.status, record.route.as_deref()) {
            let (method, path) = route.split_once(' ').unwrap_or(("", route));
            let elapsed = self.0.started.elapsed();
            let model = record.model.as_deref();
            self.0.book.http.observe(path, status, model, elapsed);
            // The access log: the route's template, never the raw path (a client's bytes).
            tracing::info!(
                target: "access",
                request_id = %self.0.request_id,
                method = super::http_metrics::method_label(method),
                route = super::http_metrics::route_label(path),
                status,
                latency_ms = elapsed.as_millis() as u64,
                token = record.token_id.as_deref().unwrap_or("-"),
                client = %self.0.book.log_pseudonym(self.0.ip),
                model = model.unwrap_or("-"),
                outcome = fate.outcome,
                "request"
            );
        }
        let record = self.fill(record, fate);
        if record.is_none() {
            self.0.book.pending.fetch_sub(1, Ordering::Relaxed);
        }
        record
    }

    fn fill(&self, mut record: AuditRecord, fate: Fate<'_>) -> Option<AuditRecord> {
        record.outcome = Some(fate.outcome.to_string());
        record.latency_ms = Some(self.0.started.elapsed().as_millis() as u64);
        record.prompt_tokens = fate.prompt_tokens.or(record.prompt_tokens);
        record.completion_tokens = fate.completion_tokens.or(record.completion_tokens);
        // Anything without a token — refusals and the public `/healthz` alike — is where a
        // flood lands: sampled per client address, the rest counted.
        if record.token_id.is_none() {
            let client = record.client.clone().unwrap_or_default();
            if !self.0.book.refusals.admit(self.0.ip, &client, fate.outcome) {
                return None;
            }
        }
        Some(record)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let Some(mut record) = self
            .record
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        // Nobody learned this request's fate: its client went away (or its task was dropped
        // at shutdown). Recorded without waiting: this runs in a destructor.
        let outcome = if self.book.shutting_down.load(Ordering::Relaxed) {
            "shutdown"
        } else {
            "client_closed"
        };
        record.outcome = Some(outcome.into());
        record.latency_ms = Some(self.started.elapsed().as_millis() as u64);
        self.book.audit.submit(record);
        self.book.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_at_a_character_boundary() {
        let p = format!("/{}", "é".repeat(400));
        let cut = bounded_path(&p);
        assert!(cut.len() < MAX_RECORDED_PATH + 40, "{}", cut.len());
        assert!(cut.contains("cut, 801 bytes"));
        assert_eq!(bounded_path("/v1/models"), "/v1/models");
    }

    #[test]
    fn refusals_over_the_rate_are_counted_not_dropped() {
        let s = RefusalSampler::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        let admitted = (0..1000)
            .filter(|_| s.admit(ip, "c1", "refused_unauthenticated"))
            .count();
        assert!((REFUSAL_BURST as usize..REFUSAL_BURST as usize + 5).contains(&admitted));
        let summary = s.drain();
        assert_eq!(summary.len(), 1);
        assert_eq!(
            summary[0].count,
            Some(1000 - admitted as u64),
            "every refusal is accounted for"
        );
        assert!(s.drain().is_empty());
    }
}
