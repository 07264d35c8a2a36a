//! Deny-by-default authentication and per-token limits.
//!
//! One middleware sees every request, matched route or not. Only [`PUBLIC`] paths pass without a
//! token; every other path needs a valid, unexpired token with the scope [`scope_for`] names, and
//! a path with no entry there is refused after authentication (so nothing can be enumerated
//! anonymously). The token store is re-read within [`RELOAD`] of any change on disk, so tokens
//! created, revoked or expired by the CLI take effect without a restart.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::tokens::{self, Rejection, Scope, TokenRecord, TokenStore};

/// Paths anyone may call.
pub const PUBLIC: &[&str] = &["/healthz", "/readyz"];
/// How often the token store is checked for changes.
pub const RELOAD: Duration = Duration::from_millis(250);
const LOCKOUT: Duration = Duration::from_secs(60);

/// The scope a route needs; `None` for a path that is not an API route.
pub fn scope_for(path: &str) -> Option<Scope> {
    match path {
        "/v1/models" | "/v1/chat/completions" | "/v1/completions" | "/tokenize" | "/detokenize" => {
            Some(Scope::Inference)
        }
        "/v1/embeddings" | "/v1/rerank" | "/rerank" => Some(Scope::Embeddings),
        p if p.starts_with("/v1/models/") => Some(Scope::Inference),
        "/metrics" => Some(Scope::Metrics),
        "/admin/tokens" | "/admin/lockdown" => Some(Scope::Admin),
        p if p.starts_with("/admin/tokens/") || p.starts_with("/admin/models/") => {
            Some(Scope::Admin)
        }
        _ => None,
    }
}

/// The current token records, refreshed from disk by [`TokenCache::refresh`].
pub struct TokenCache {
    store: TokenStore,
    records: RwLock<Arc<Vec<TokenRecord>>>,
    stamp: Mutex<Option<(SystemTime, u64, u64)>>,
}

impl TokenCache {
    pub fn new(store: TokenStore) -> Result<Self, tokens::TokenError> {
        let cache = TokenCache {
            records: RwLock::new(Arc::new(store.load()?)),
            store,
            stamp: Mutex::new(None),
        };
        cache.refresh()?;
        Ok(cache)
    }

    pub fn store_path(&self) -> PathBuf {
        self.store.path()
    }

    pub fn store(&self) -> &TokenStore {
        &self.store
    }

    pub fn records(&self) -> Arc<Vec<TokenRecord>> {
        self.records.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Re-reads the store if its file changed (mtime, size or inode). A store that cannot be
    /// read or parsed changes nothing: the last good token set stays in force (revocations
    /// already seen stay revoked; a planted or half-written file cannot empty the server or
    /// make it record revocations that never happened) and the error is returned, to be
    /// logged and counted; the read is retried at the next refresh.
    pub fn refresh(&self) -> Result<(), tokens::TokenError> {
        use std::os::unix::fs::MetadataExt;
        let stamp = std::fs::metadata(self.store.path()).ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        });
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == stamp {
            return Ok(());
        }
        let records = self.store.load()?;
        if let Ok(mut w) = self.records.write() {
            *w = Arc::new(records);
        }
        *last = stamp;
        Ok(())
    }
}

/// Who a request is from, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub token_name: String,
    pub record: TokenRecord,
}

/// Per-token rate limits and per-client failed-authentication lockouts.
pub struct Limiters {
    requests: Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
    generated: Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    locked: Mutex<HashMap<IpAddr, Instant>>,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("max(1)"))
}

impl Limiters {
    /// `failed_auth_per_min` failed authentications per client per minute lock it out.
    pub fn new(failed_auth_per_min: u32) -> Self {
        Limiters {
            requests: Mutex::default(),
            generated: Mutex::default(),
            failures: governor::RateLimiter::keyed(per_minute(failed_auth_per_min)),
            locked: Mutex::default(),
        }
    }
}

/// A limit was hit; retry after this long.
#[derive(Debug)]
pub struct Limited {
    pub retry_after: Duration,
    pub what: &'static str,
    /// The request alone exceeds the limit: waiting cannot help (a 400, not a 429).
    pub never_fits: bool,
}

fn limiter(
    map: &Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
    id: &str,
    per_min: u32,
) -> Arc<DefaultDirectRateLimiter> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    // A token whose limit was changed gets a fresh limiter.
    match map.get(id) {
        Some((n, l)) if *n == per_min => l.clone(),
        _ => {
            let l = Arc::new(governor::RateLimiter::direct(per_minute(per_min)));
            map.insert(id.to_string(), (per_min, l.clone()));
            l
        }
    }
}

fn wait_of(not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> Duration {
    use governor::clock::Clock;
    not_until.wait_time_from(governor::clock::DefaultClock::default().now())
}

impl Limiters {
    /// Whether `ip` is locked out after too many failed authentications.
    pub fn locked_out(&self, ip: IpAddr) -> Option<Duration> {
        let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        match locked.get(&ip) {
            Some(until) if *until > Instant::now() => Some(*until - Instant::now()),
            Some(_) => {
                locked.remove(&ip);
                None
            }
            None => None,
        }
    }

    /// Records a failed authentication; locks the client out once it exceeds the rate.
    /// Returns true when this failure starts a lockout.
    pub fn failed_auth(&self, ip: IpAddr) -> bool {
        let mut locked_now = false;
        if self.failures.check_key(&ip).is_err() {
            locked_now = true;
            let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
            // Many distinct addresses (think IPv6) must not grow this without bound.
            if locked.len() > 100_000 {
                let now = Instant::now();
                locked.retain(|_, until| *until > now);
            }
            locked.insert(ip, Instant::now() + LOCKOUT);
            tracing::warn!(
                "authentication failures over the limit from one client; it is locked out"
            );
        }
        if self.failures.len() > 100_000 {
            self.failures.retain_recent();
        }
        locked_now
    }

    /// One request by this token.
    pub fn request(&self, record: &TokenRecord) -> Result<(), Limited> {
        limiter(&self.requests, &record.id, record.limits.requests_per_min)
            .check()
            .map_err(|n| Limited {
                never_fits: false,
                retry_after: wait_of(n),
                what: "request rate",
            })
    }

    /// Reserves `tokens` of this token's per-minute token budget: prompt (or embedding input)
    /// tokens plus the most it may generate.
    pub fn tokens(&self, record: &TokenRecord, tokens: u64) -> Result<(), Limited> {
        let l = limiter(&self.generated, &record.id, record.limits.tokens_per_min);
        let n = u32::try_from(tokens.max(1)).unwrap_or(u32::MAX);
        match l.check_n(NonZeroU32::new(n).expect("max(1)")) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(n)) => Err(Limited {
                retry_after: wait_of(n),
                what: "token budget",
                never_fits: false,
            }),
            Err(_) => Err(Limited {
                retry_after: Duration::ZERO,
                what: "this request alone needs more tokens (prompt plus max_tokens) than the token's per-minute budget",
                never_fits: true,
            }),
        }
    }
}

/// Authenticates the `Authorization: Bearer` value.
pub fn authenticate(cache: &TokenCache, header: Option<&str>) -> Result<Caller, Rejection> {
    // RFC 7235: the scheme name is case-insensitive.
    let header = header.ok_or(Rejection::Missing)?;
    let token = match header.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => return Err(Rejection::Malformed),
    };
    let records = cache.records();
    let record = tokens::authenticate(&records, token, tokens::now())?;
    Ok(Caller {
        token_id: record.id.clone(),
        token_name: record.name.clone(),
        record: record.clone(),
    })
}
