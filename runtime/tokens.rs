//! Built-in access tokens: scoped, per-model, expiring, revocable, stored only as hashes.
//!
//! A token reads `srt_<id>_<secret>_<check>`: `id` (16 hex) names the record, `secret` is 256
//! random bits in base64url, `check` is 8 hex of SHA-256 over the rest, so a secret scanner can
//! recognise a leaked token and a typo is reported as malformed without a lookup. The store
//! (`<state>/tokens.json`, 0600) keeps the SHA-256 of each secret, never the secret: the secret
//! carries 256 bits of entropy, so a fast hash is enough, and verification compares hashes in
//! constant time. Writes take an exclusive lock and replace the file atomically, so the CLI and
//! a running server never see half a store.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "srt_";
const STORE_FILE: &str = "tokens.json";
const LOCK_FILE: &str = "tokens.lock";
const MAX_STORE: u64 = 16 * 1024 * 1024;

/// What a token may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Inference,
    Embeddings,
    Metrics,
    Admin,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inference" => Ok(Scope::Inference),
            "embeddings" => Ok(Scope::Embeddings),
            "metrics" => Ok(Scope::Metrics),
            "admin" => Ok(Scope::Admin),
            _ => Err(format!(
                "unknown scope {s:?} (inference, embeddings, metrics, admin)"
            )),
        }
    }
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Embeddings => "embeddings",
            Scope::Metrics => "metrics",
            Scope::Admin => "admin",
        }
    }
}

/// Per-token limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per minute.
    pub requests_per_min: u32,
    /// Generated tokens per minute.
    pub tokens_per_min: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests_per_min: 60,
            tokens_per_min: 20_000,
        }
    }
}

/// One token as stored (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    /// SHA-256 (hex) of the secret part.
    pub secret_sha256: String,
    pub scopes: BTreeSet<Scope>,
    /// Models this token may use; empty means any.
    #[serde(default)]
    pub models: Vec<String>,
    pub limits: Limits,
    /// Unix seconds.
    pub created: u64,
    pub expires: Option<u64>,
    /// The holder's consent to having prompt and completion content recorded
    /// (`--audit-content`); without it, content is never recorded for this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_content: Option<Consent>,
}

/// A consent to content recording: when, and who recorded it (on the data subject's behalf).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// Unix seconds.
    pub time: u64,
    /// Who created the token with the consent: the CLI, or an admin token's id.
    pub recorded_by: String,
    /// What was consented to.
    pub scope: String,
}

impl Consent {
    pub const SCOPE: &'static str =
        "prompt and completion content in the audit log (--audit-content hmac|full)";

    pub fn now(recorded_by: impl Into<String>) -> Consent {
        Consent {
            time: now(),
            recorded_by: recorded_by.into(),
            scope: Self::SCOPE.into(),
        }
    }

    /// The consent's own audit record.
    pub fn audit_event(&self, token: &TokenRecord) -> crate::audit::AuditRecord {
        let mut r = crate::audit::AuditRecord::event("consent_content_given").with_detail(format!(
            "consent to {} given at unix {}, recorded by {}",
            self.scope, self.time, self.recorded_by
        ));
        r.token_id = Some(token.id.clone());
        r.outcome = Some("ok".into());
        r
    }
}

/// What may be shown of a token outside the store: everything but the secret's hash (a hash
/// of a 256-bit secret cannot be reversed, but it is a verifier and stays in the store).
#[derive(Debug, Clone, Serialize)]
pub struct TokenView<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub scopes: &'a BTreeSet<Scope>,
    pub models: &'a [String],
    pub limits: &'a Limits,
    pub created: u64,
    pub expires: Option<u64>,
    pub consent_content: Option<&'a Consent>,
}

impl TokenRecord {
    /// The record without its secret hash, for APIs and listings.
    pub fn view(&self) -> TokenView<'_> {
        TokenView {
            id: &self.id,
            name: &self.name,
            scopes: &self.scopes,
            models: &self.models,
            limits: &self.limits,
            created: self.created,
            expires: self.expires,
            consent_content: self.consent_content.as_ref(),
        }
    }

    /// An audit record of a change to this token: id, name, scopes and expiry, never the
    /// secret.
    pub fn audit_event(&self, event: &str) -> crate::audit::AuditRecord {
        let mut rec = crate::audit::AuditRecord::event(event).with_detail(format!(
            "name {:?}, scopes {}, expires {}",
            self.name,
            self.scope_list(),
            self.expires
                .map_or_else(|| "never".into(), |s| format!("unix {s}"))
        ));
        rec.token_id = Some(self.id.clone());
        rec
    }

    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    /// The scopes, comma-separated.
    pub fn scope_list(&self) -> String {
        let names: Vec<&str> = self.scopes.iter().map(|s| s.as_str()).collect();
        names.join(",")
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    tokens: Vec<TokenRecord>,
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt token store: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("a token named {0:?} already exists")]
    DuplicateName(String),
    #[error("no token with id or name {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn checksum(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..4])
}

/// The parts of a well-formed token: record id and secret.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, rest) = rest.split_once('_')?;
    let (secret, check) = rest.rsplit_once('_')?;
    let well_formed = id.len() == 16
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && secret.len() == 43
        && URL_SAFE_NO_PAD.decode(secret).is_ok_and(|b| b.len() == 32)
        && check.len() == 8;
    let body = &token[..token.len() - check.len() - 1];
    (well_formed && checksum(body) == check).then_some((id, secret))
}

fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The token store in a state directory.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

/// A newly created token: the record and the secret, shown once.
pub struct Created {
    pub record: TokenRecord,
    pub token: String,
}

impl TokenStore {
    pub fn new(state_dir: &Path) -> Self {
        TokenStore {
            dir: state_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// Every token record (an absent store is empty).
    pub fn load(&self) -> Result<Vec<TokenRecord>, TokenError> {
        Ok(self.read()?.tokens)
    }

    fn read(&self) -> Result<StoreFile, TokenError> {
        let path = self.path();
        let bytes = match securerun_models::fsutil::read_bounded(&path, MAX_STORE) {
            Ok(b) => b,
            Err(securerun_models::fsutil::OpenError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(StoreFile::default())
            }
            Err(e) => {
                return Err(TokenError::Corrupt {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| TokenError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Runs `change` on the store under an exclusive lock and replaces the file atomically.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<TokenRecord>) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        crate::trust::create_private_dir(&self.dir).map_err(io_err(&self.dir))?;
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = crate::trust::open_lock_file(&lock_path).map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let mut store = self.read()?;
        let out = change(&mut store.tokens)?;
        store.version = 1;
        let path = self.path();
        let tmp = self
            .dir
            .join(format!(".{STORE_FILE}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let json =
            serde_json::to_vec_pretty(&store).map_err(|e| TokenError::Invalid(e.to_string()))?;
        f.write_all(&json).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(out)
    }

    /// Creates a token; the returned secret is not stored anywhere.
    pub fn create(
        &self,
        name: &str,
        scopes: BTreeSet<Scope>,
        models: Vec<String>,
        limits: Limits,
        expires: Option<u64>,
    ) -> Result<Created, TokenError> {
        let created = Self::prepare(name, scopes, models, limits, expires)?;
        self.insert(&created.record)?;
        Ok(created)
    }

    /// A token made and checked but not stored: its record can be audited before it exists.
    pub fn prepare(
        name: &str,
        scopes: BTreeSet<Scope>,
        models: Vec<String>,
        limits: Limits,
        expires: Option<u64>,
    ) -> Result<Created, TokenError> {
        if !valid_name(name) {
            return Err(TokenError::Invalid(
                "a token name is 1 to 64 printable characters, without control, bidirectional or invisible formatting characters".into(),
            ));
        }
        if scopes.is_empty() {
            return Err(TokenError::Invalid(
                "a token needs at least one scope".into(),
            ));
        }
        let mut raw = [0u8; 32];
        OsRng.fill_bytes(&mut raw);
        let secret = URL_SAFE_NO_PAD.encode(raw);
        let mut id = [0u8; 8];
        OsRng.fill_bytes(&mut id);
        let id = hex::encode(id);
        let body = format!("{PREFIX}{id}_{secret}");
        let token = format!("{body}_{}", checksum(&body));
        let record = TokenRecord {
            id,
            name: name.to_string(),
            secret_sha256: secret_hash(&secret),
            scopes,
            models,
            limits,
            created: now(),
            expires,
            consent_content: None,
        };
        Ok(Created { record, token })
    }

    /// Stores a prepared token (names are unique).
    pub fn insert(&self, record: &TokenRecord) -> Result<(), TokenError> {
        let stored = record.clone();
        self.update(move |tokens| {
            if tokens.iter().any(|t| t.name == stored.name) {
                return Err(TokenError::DuplicateName(stored.name.clone()));
            }
            tokens.push(stored);
            Ok(())
        })
    }

    /// The token with this id or name.
    pub fn find(&self, id_or_name: &str) -> Result<TokenRecord, TokenError> {
        self.load()?
            .into_iter()
            .find(|t| t.id == id_or_name || t.name == id_or_name)
            .ok_or_else(|| TokenError::NotFound(id_or_name.to_string()))
    }

    /// Revokes every token; returns how many there were.
    pub fn revoke_all(&self) -> Result<usize, TokenError> {
        self.update(|tokens| {
            let n = tokens.len();
            tokens.clear();
            Ok(n)
        })
    }

    /// Revokes (deletes) a token by id or name.
    pub fn revoke(&self, id_or_name: &str) -> Result<TokenRecord, TokenError> {
        self.update(|tokens| {
            let i = tokens
                .iter()
                .position(|t| t.id == id_or_name || t.name == id_or_name)
                .ok_or_else(|| TokenError::NotFound(id_or_name.to_string()))?;
            Ok(tokens.remove(i))
        })
    }
}

/// Token names appear in listings, logs and audit exports read by people: no control
/// characters, no bidirectional overrides or invisible format characters (which can make a name
/// display as another), no leading or trailing space.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.trim() == name
        && !name.chars().any(|c| c.is_control() || is_format_char(c))
}

/// Unicode format characters (general category Cf) and other invisible characters that
/// change how text displays.
fn is_format_char(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFFB | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF)
}

/// Why a presented token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Malformed,
    Unknown,
    Expired,
}

/// Finds the record a presented token belongs to, comparing secret hashes in constant time.
pub fn authenticate<'a>(
    records: &'a [TokenRecord],
    token: &str,
    now: u64,
) -> Result<&'a TokenRecord, Rejection> {
    let (id, secret) = parse(token).ok_or(Rejection::Malformed)?;
    let presented = secret_hash(secret);
    let record = records
        .iter()
        .find(|r| r.id == id)
        .ok_or(Rejection::Unknown)?;
    if !bool::from(presented.as_bytes().ct_eq(record.secret_sha256.as_bytes())) {
        return Err(Rejection::Unknown);
    }
    if record.expired(now) {
        return Err(Rejection::Expired);
    }
    Ok(record)
}

/// Parses `30d`, `12h`, `90m`, `3600s` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 30d, 12h, 90m)"))?;
    let mult = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("invalid duration {s:?} (use e.g. 30d, 12h, 90m)")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("invalid duration {s:?}"))
}

/// Parses a rate like `60/min`, `10/s`, `120/h` into requests per minute. Limits are enforced
/// per minute, so only rates that are a whole number per minute are accepted: `100/hour` is
/// refused rather than silently enforced as 1/min.
pub fn parse_rate(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid rate {s:?} (use e.g. 60/min, 2/s, 120/h)");
    let (n, per) = s.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.parse().map_err(|_| bad())?;
    let per_min = match per {
        "s" | "sec" => n.checked_mul(60),
        "m" | "min" => Some(n),
        "h" | "hour" if n.is_multiple_of(60) => Some(n / 60),
        "h" | "hour" => {
            return Err(format!(
                "rate {s:?}: limits are enforced per minute and {n} per hour is not a whole number per minute; use {}/min or {}/h",
                n.div_ceil(60).max(1),
                n.div_ceil(60).max(1) * 60
            ))
        }
        _ => None,
    }
    .ok_or_else(bad)?;
    if per_min == 0 {
        return Err(bad());
    }
    Ok(per_min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let created = store
            .create(
                "ci",
                [Scope::Inference].into(),
                vec![],
                Limits::default(),
                None,
            )
            .unwrap();
        let records = store.load().unwrap();
        assert_eq!(
            authenticate(&records, &created.token, now()).unwrap().name,
            "ci"
        );
        assert!(!std::fs::read_to_string(store.path())
            .unwrap()
            .contains(parse(&created.token).unwrap().1));
        // One changed character: the checksum catches it before any lookup.
        let mut t = created.token.clone().into_bytes();
        t[30] = if t[30] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(t).unwrap();
        assert_eq!(authenticate(&records, &t, now()), Err(Rejection::Malformed));
        assert_eq!(
            authenticate(&records, "Bearer nonsense", now()),
            Err(Rejection::Malformed)
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        store.revoke("ci").unwrap();
        assert_eq!(
            authenticate(&store.load().unwrap(), &created.token, now()),
            Err(Rejection::Unknown)
        );
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert!(parse_duration("0d").is_err() && parse_duration("5y").is_err());
        assert_eq!(parse_rate("60/min").unwrap(), 60);
        assert_eq!(parse_rate("2/s").unwrap(), 120);
        assert!(parse_rate("0/min").is_err() && parse_rate("abc").is_err());
        // Only what is enforced: 100/hour would be 1.67/min, which the per-minute limiter
        // cannot honour (it used to become 1/min silently).
        assert_eq!(parse_rate("120/h").unwrap(), 2);
        assert!(parse_rate("100/hour").is_err() && parse_rate("30/h").is_err());
        assert!(parse_rate("10/day").is_err());
    }
}
