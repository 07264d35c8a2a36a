//! Accepting and keeping connections, with every resource a client controls bounded.
//!
//! - **How many**: at most `max_connections_per_client` from one address, closed at once over
//!   it (no TLS, no parsing). At `max_connections` in all, a new connection evicts the
//!   connection that has been idle (no request in flight) the longest; only if none is idle is
//!   the new one closed. A flood of idle or half-open connections from many addresses thus
//!   cannot lock out a client that comes to send a request, and requests in flight are never
//!   cut for room.
//! - **How long idle**: a connection with no request in flight is closed after
//!   `idle_timeout` (this also ends a partial request line or headers, a partial HTTP/2
//!   preface, and a connection that never sends a byte); a TLS handshake gets the same time.
//! - **How long stalled**: a response whose client stops reading (a full TCP send buffer, or an
//!   HTTP/2 flow-control window held at zero) is cut off after `send_timeout` without progress.
//! - **Malformed HTTP** that hyper refuses itself (oversized heads, bad syntax) never reaches a
//!   handler; it is recorded here, through the same rate-limited path as other anonymous
//!   refusals.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::tls::ReloadableTls;
use axum::body::Body;
use axum::Router;
use http_body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// Bounds on connections (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    /// hyper's own cap on an HTTP/1 head and an HTTP/2 header list: a backstop above the
    /// request-level cap that answers in the API's error shape.
    pub max_head_bytes: usize,
}

/// What the accept loop reports (for `/metrics` and the audit log).
pub trait ConnectionEvents: Send + Sync + 'static {
    /// A connection was closed at once because a cap was reached.
    fn refused(&self, peer: SocketAddr, per_client: bool);
    /// A connection was closed for idling or stalling.
    fn timed_out(&self, peer: SocketAddr, stalled: bool);
    /// hyper refused a request before any handler saw it (`status` it answered, if any).
    fn malformed(&self, peer: SocketAddr, status: u16);
    /// The number of open connections changed.
    fn open(&self, count: usize);
    /// hyper has parsed a request and hands it over (called synchronously, before any future
    /// runs: whatever happens to the request afterwards, this has happened).
    fn dispatched(&self, req: &mut axum::extract::Request);
    /// Whether `peer` is exempt from the per-client cap (a trusted reverse proxy carries many
    /// clients on its connections; they are told apart by the forwarded address).
    fn shared_peer(&self, peer: SocketAddr) -> bool;
}

/// The service hyper calls for each request of one connection.
#[derive(Clone)]
struct Dispatch {
    app: Router,
    activity: Arc<Activity>,
    peer: SocketAddr,
    events: Arc<dyn ConnectionEvents>,
}

impl tower::Service<hyper::Request<hyper::body::Incoming>> for Dispatch {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        // Counted in flight, and opened in the audit ledger, now: a request dropped before its
        // future first runs (its client closed at once) is still seen.
        let ticket = InFlight::new(self.activity.clone());
        let mut req = req.map(Body::new);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo::<SocketAddr>(self.peer));
        self.events.dispatched(&mut req);
        let app = self.app.clone();
        Box::pin(async move {
            let resp = tower::ServiceExt::oneshot(app, req).await?;
            Ok(resp.map(|b| Body::new(WatchedBody::new(b, ticket))))
        })
    }
}

/// Raises the soft open-file limit to the hard limit and returns it: every connection is a
/// descriptor, and the default soft limit (often 1024) is what an idle-connection flood
/// exhausts first.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Per-address connection counts.
#[derive(Default)]
struct PerClient {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection slot of one address; released on drop.
struct ClientSlot {
    table: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// How long every response of a connection must have waited on its client before the
/// connection may be evicted for room.
const STALL_EVICTABLE: Duration = Duration::from_millis(250);

/// Evictions that may be under way at once: the open count can exceed `max_connections` by
/// this much while evicted connections close.
const EVICTION_SLACK: usize = 64;

/// Every open connection, for eviction.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    next: AtomicU64,
    evicting: AtomicUsize,
}

struct ConnEntry {
    id: u64,
    ip: IpAddr,
    activity: Arc<Activity>,
    evict: Arc<tokio::sync::Notify>,
    evicted: std::sync::atomic::AtomicBool,
    table: std::sync::Weak<Connections>,
}

/// A connection's place in the table; leaving it (drop) frees the place.
struct Admitted(Arc<ConnEntry>);

impl std::ops::Deref for Admitted {
    type Target = ConnEntry;
    fn deref(&self) -> &ConnEntry {
        &self.0
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(table) = self.0.table.upgrade() {
            if self.0.evicted.load(Ordering::Relaxed) {
                table.evicting.fetch_sub(1, Ordering::Relaxed);
            }
            table
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.0.id);
        }
    }
}

impl Connections {
    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Admits a connection, evicting the longest-idle one when `max` are open.
    fn admit(self: &Arc<Self>, max: usize, ip: IpAddr, clients: &PerClient) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= max {
            if self.evicting.load(Ordering::Relaxed) >= EVICTION_SLACK {
                return None;
            }
            // Evictable: no request in flight, or every response stalled on its client for a
            // while (an HTTP/2 window held at zero keeps a request "in flight" at no cost).
            // Among those, the connection of the address holding the most connections, then
            // the one idle or stalled the longest: a flood's own connections go first.
            let counts = clients.counts.lock().unwrap_or_else(|p| p.into_inner());
            let victim = open
                .values()
                .filter(|c| !c.evicted.load(Ordering::Relaxed))
                .filter_map(|c| c.activity.evictable_since().map(|since| (c, since)))
                .max_by_key(|(c, since)| {
                    (
                        counts.get(&c.ip).copied().unwrap_or(0),
                        std::cmp::Reverse(*since),
                    )
                })?
                .0
                .clone();
            drop(counts);
            victim.evicted.store(true, Ordering::Relaxed);
            self.evicting.fetch_add(1, Ordering::Relaxed);
            victim.evict.notify_one();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ConnEntry {
            id,
            ip,
            activity: Activity::new(),
            evict: Arc::default(),
            evicted: Default::default(),
            table: Arc::downgrade(self),
        });
        open.insert(id, entry.clone());
        Some(Admitted(entry))
    }
}

/// Milliseconds since `epoch`, for lock-free timestamps.
fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// What one connection is doing, as its watchdog sees it.
struct Activity {
    epoch: Instant,
    /// Requests whose response has not finished (body included).
    in_flight: AtomicUsize,
    /// When the last request started or finished (ms since `epoch`).
    last_change: AtomicU64,
    /// Response bodies that handed hyper a frame it has not come back for since, and when the
    /// oldest such hand-over happened (ms since `epoch`, `u64::MAX` when none).
    waiting_on_client: Mutex<HashMap<u64, u64>>,
    next_body: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_change: AtomicU64::new(0),
            waiting_on_client: Mutex::default(),
            next_body: AtomicU64::new(0),
        })
    }

    /// Since when the connection could be closed without cutting work that is progressing:
    /// idle since its last request (or creation), or with every response in flight stalled on
    /// its client for at least [`STALL_EVICTABLE`]. `None` while work progresses.
    fn evictable_since(&self) -> Option<Instant> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        if in_flight == 0 {
            return Some(
                self.epoch + Duration::from_millis(self.last_change.load(Ordering::Relaxed)),
            );
        }
        let waiting = self
            .waiting_on_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if waiting.len() < in_flight {
            return None;
        }
        let newest = *waiting.values().max()?;
        let since = self.epoch + Duration::from_millis(newest);
        (since.elapsed() >= STALL_EVICTABLE).then_some(since)
    }

    fn touch(&self) {
        self.last_change
            .store(ms_since(self.epoch), Ordering::Relaxed);
    }

    /// Why the connection should be closed now, if it should.
    fn verdict(&self, limits: &ConnectionLimits) -> Option<bool> {
        let now = ms_since(self.epoch);
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let idle = now.saturating_sub(self.last_change.load(Ordering::Relaxed));
            return (idle > limits.idle_timeout.as_millis() as u64).then_some(false);
        }
        let waiting = self
            .waiting_on_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let oldest = waiting.values().copied().min()?;
        // Twice the send timeout: a stream task notices a stalled client first (after one) and
        // ends it with its own record; this catches what no task watches.
        let stalled_for = now.saturating_sub(oldest);
        (stalled_for > 2 * limits.send_timeout.as_millis() as u64).then_some(true)
    }
}

/// One request in flight, from the moment it reaches the service until its response body
/// ends (or the request is dropped).
struct InFlight {
    activity: Arc<Activity>,
}

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.touch();
        InFlight { activity }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.activity.touch();
    }
}

/// A response body that keeps its request in flight until it ends, and tells the watchdog
/// when it waits on the client (hyper took a frame and has not asked for the next one).
struct WatchedBody {
    inner: Body,
    ticket: InFlight,
    id: u64,
}

impl WatchedBody {
    fn new(inner: Body, ticket: InFlight) -> Self {
        let id = ticket.activity.next_body.fetch_add(1, Ordering::Relaxed);
        WatchedBody { inner, ticket, id }
    }

    fn set_waiting(&self, waiting: bool) {
        let mut map = self
            .ticket
            .activity
            .waiting_on_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if waiting {
            map.insert(self.id, ms_since(self.ticket.activity.epoch));
        } else {
            map.remove(&self.id);
        }
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl http_body::Body for WatchedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // hyper is back for more: whatever it took before has been written.
        self.set_waiting(false);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.set_waiting(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Kernel send buffer per connection (Linux doubles it for bookkeeping).
const SEND_BUFFER: usize = 128 * 1024;

/// How often each connection's watchdog looks.
const WATCH: Duration = Duration::from_millis(250);

/// Accepts connections until `shutdown` resolves, then waits up to `drain` for open ones.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    app: Router,
    limits: ConnectionLimits,
    events: Arc<dyn ConnectionEvents>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_head_bytes as u32)
        .max_concurrent_streams(32)
        .max_pending_accept_reset_streams(Some(32))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let table = Arc::new(Connections::default());
    let per_client = Arc::new(PerClient::default());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let client = super::client::limit_key(peer.ip());
        let per_client_cap = if events.shared_peer(peer) {
            limits.max_connections
        } else {
            limits.max_connections_per_client
        };
        let Some(slot) = per_client.take(client, per_client_cap) else {
            events.refused(peer, true);
            drop(stream);
            continue;
        };
        let Some(entry) = table.admit(limits.max_connections, client, &per_client) else {
            events.refused(peer, false);
            drop(stream);
            continue;
        };
        events.open(table.len());
        // Bounded kernel memory per connection: a client that stops reading can pin at most
        // this much of the host's socket memory (autotuning would grow it to megabytes), and
        // a stalled response is noticed (and cut) instead of vanishing into the kernel.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let activity = entry.activity.clone();
        let evict = entry.evict.clone();
        let service = hyper_util::service::TowerToHyperService::new(Dispatch {
            app: app.clone(),
            activity: activity.clone(),
            peer,
            events: events.clone(),
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        // The configuration current now (a reload swaps it for later connections only).
        let tls = tls.as_ref().map(|t| t.acceptor());
        let events = events.clone();
        let table = table.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let result = match tls {
                Some(acceptor) => {
                    // A handshake that does not finish in time is dropped (slowloris).
                    match tokio::time::timeout(limits.idle_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                            watch(watcher.watch(conn.into_owned()), &activity, &evict, &limits)
                                .await
                        }
                        _ => {
                            tracing::debug!("TLS handshake failed or timed out");
                            Outcome::Closed(None)
                        }
                    }
                }
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watch(watcher.watch(conn.into_owned()), &activity, &evict, &limits).await
                }
            };
            match result {
                Outcome::Closed(Some(status)) => events.malformed(peer, status),
                Outcome::Closed(None) => {}
                Outcome::Cut { stalled } => events.timed_out(peer, stalled),
            }
            drop(entry);
            events.open(table.len());
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing remaining connections");
    }
}

enum Outcome {
    /// The connection ended by itself; `Some(status)` when hyper refused a malformed request.
    Closed(Option<u16>),
    /// The watchdog closed it: idle (`stalled: false`) or a client that stopped reading.
    Cut { stalled: bool },
}

/// Drives a connection, closing it when its watchdog says so or when it is evicted.
async fn watch<F, E>(
    conn: F,
    activity: &Activity,
    evict: &tokio::sync::Notify,
    limits: &ConnectionLimits,
) -> Outcome
where
    F: std::future::Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(WATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = &mut conn => {
                return Outcome::Closed(result.err().and_then(|e| malformed_status(e.into())));
            }
            _ = evict.notified() => return Outcome::Cut { stalled: false },
            _ = tick.tick() => {
                if let Some(stalled) = activity.verdict(limits) {
                    return Outcome::Cut { stalled };
                }
            }
        }
    }
}

/// The status hyper answered a request it could not parse with (it never reached a handler).
fn malformed_status(e: Box<dyn std::error::Error + Send + Sync>) -> Option<u16> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return Some(431);
            }
            if h.is_parse() || h.is_parse_status() {
                return Some(400);
            }
            return None;
        }
        source = err.source();
    }
    None
}
