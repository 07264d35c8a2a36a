//! `securerun audit verify|export|tail|report|hmac|shred`: reading, checking and retaining the
//! audit log with the read key (or, for `verify`, the public checkpoint root alone).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::CmdResult;
use crate::audit::{self, retention, verify, AuditRecord, EpochKey};

#[derive(Args, Clone)]
pub struct LogArgs {
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The read key (default: read.key in the audit directory; keep it off the host).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

/// A time filter: unix seconds, an RFC 3339 time (`2026-11-22T10:00:00Z`), a UTC date
/// (`2026-11-22`), or an age (`90m`, `24h`, `7d`: that long ago).
fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs);
    }
    if let Ok(age) = crate::tokens::parse_duration(s) {
        return Ok(crate::tokens::now().saturating_sub(age));
    }
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return u64::try_from(t.as_second()).map_err(|_| format!("{s:?} is before 1970"));
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        let t = d
            .to_datetime(jiff::civil::Time::midnight())
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map_err(|e| e.to_string())?;
        return u64::try_from(t.timestamp().as_second())
            .map_err(|_| format!("{s:?} is before 1970"));
    }
    Err(format!(
        "{s:?}: expected unix seconds, an RFC 3339 time (2026-11-22T10:00:00Z), a date (2026-11-22) or an age (24h, 7d)"
    ))
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify every record and checkpoint; exit non-zero with the first bad position.
    Verify {
        #[command(flatten)]
        log: LogArgs,
        /// A head printed by an earlier verify (`SEQ:HASH`): the log must still contain it.
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Option<String>,
        /// Integrity only, without the read key: check the chain against the checkpoints
        /// signed under this root (`audit.pub`, kept off the host). Nothing is decrypted.
        #[arg(long, value_name = "AUDIT.PUB", conflicts_with = "key")]
        public: Option<PathBuf>,
    },
    /// Export verified records, decrypted, one JSON object per line.
    Export {
        #[command(flatten)]
        log: LogArgs,
        /// Records at or after: unix seconds, RFC 3339, a date, or an age (24h, 7d).
        #[arg(long, value_parser = parse_time)]
        since: Option<u64>,
        /// Records at or before (same forms as --since).
        #[arg(long, value_parser = parse_time)]
        until: Option<u64>,
        #[arg(long, value_name = "ID")]
        token: Option<String>,
        #[arg(long, value_name = "EVENT")]
        event: Option<String>,
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
    },
    /// Print the latest records; with -f, keep printing new ones.
    Tail {
        #[command(flatten)]
        log: LogArgs,
        #[arg(short = 'n', default_value_t = 20)]
        lines: usize,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// A post-incident summary: activity per token, refusals, rate limits, lockouts, events.
    Report {
        #[command(flatten)]
        log: LogArgs,
    },
    /// Retention: make every epoch before a point unreadable for good (crypto-shredding) by
    /// replacing the read key with a later epoch's, then delete those segments. Without
    /// --yes, only says what it would do.
    Shred {
        #[command(flatten)]
        log: LogArgs,
        /// Shred epochs before this one.
        #[arg(
            long,
            value_name = "EPOCH",
            required_unless_present = "older_than",
            conflicts_with = "older_than"
        )]
        before_epoch: Option<u32>,
        /// Shred epochs that ended longer ago than this (e.g. 90d).
        #[arg(long, value_name = "AGE", value_parser = crate::tokens::parse_duration)]
        older_than: Option<u64>,
        /// Do it (irreversible once every other copy of the old read key is destroyed).
        #[arg(long)]
        yes: bool,
    },
    /// The keyed HMAC of a text or client address, to search an export made with
    /// `--audit-content hmac` (or the `client` field) for it.
    Hmac {
        text: String,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

impl LogArgs {
    fn dir(&self) -> Result<PathBuf, crate::trust::TrustError> {
        let state = crate::state_dir::resolve(self.state_dir.clone())?;
        Ok(audit::audit_dir(&state))
    }

    fn key_path(&self) -> Result<PathBuf, crate::trust::TrustError> {
        Ok(match &self.key {
            Some(k) => k.clone(),
            None => self.dir()?.join(audit::keys::READ_KEY),
        })
    }

    fn open(&self) -> Result<(PathBuf, EpochKey), Box<dyn std::error::Error>> {
        let (dir, key_path) = (self.dir()?, self.key_path()?);
        let key = EpochKey::load(&key_path).map_err(|e| {
            format!("{e} (pass the read key kept off this host with --key, or check integrity alone with audit verify --public audit.pub)")
        })?;
        Ok((dir, key))
    }

    fn verified(&self) -> Result<verify::Verified, Box<dyn std::error::Error>> {
        let (dir, key) = self.open()?;
        Ok(verify::verify(&dir, &key)?)
    }
}

/// One exported record: the record, its sequence number and its time in RFC 3339.
fn print(seq: u64, r: &AuditRecord) -> Result<(), Box<dyn std::error::Error>> {
    let mut v = serde_json::to_value(r)?;
    v["seq"] = seq.into();
    if let Ok(t) = jiff::Timestamp::from_millisecond(r.time_ms as i64) {
        v["time"] = t.to_string().into();
    }
    println!("{v}");
    Ok(())
}

fn parse_anchor(anchor: &str) -> Result<(u64, [u8; 32]), String> {
    let usage = "--anchor is SEQ:HASH as printed by audit verify";
    let (seq, hash) = anchor.split_once(':').ok_or(usage)?;
    let seq = seq.parse().map_err(|_| usage)?;
    let hash = hex::decode(hash)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or(usage)?;
    Ok((seq, hash))
}

pub fn run(cmd: AuditCommand) -> CmdResult {
    match cmd {
        AuditCommand::Verify {
            log,
            anchor,
            public,
        } => {
            let anchor = anchor.as_deref().map(parse_anchor).transpose()?;
            let dir = log.dir()?;
            let access = match &public {
                Some(p) => verify::Access::Integrity(crate::trust::read_key(p)?),
                None => verify::Access::Read(log.open()?.1),
            };
            let v = verify::verify_with(&dir, &access, anchor)?;
            for t in &v.torn {
                eprintln!(
                    "note: {t} (a crash during a write; every complete record before it verified)"
                );
            }
            if v.first_epoch > 1 {
                eprintln!(
                    "note: epochs before {} were shredded (retention); records 1..{} are gone",
                    v.first_epoch, v.first_seq
                );
            }
            let unattested = v.last_seq - v.attested_seq.max(v.first_seq);
            if public.is_some() {
                println!(
                    "ok (integrity only, nothing decrypted): {} records in {} segments chained, {} signed checkpoints agree; records after {} are not yet attested by a checkpoint ({unattested}); head {}:{}",
                    v.count, v.segments, v.checkpoints, v.attested_seq, v.last_seq, hex::encode(v.head)
                );
            } else {
                println!(
                    "ok: {} records in {} segments verified, {} signed checkpoints agree ({unattested} records since the last); head {}:{}",
                    v.count, v.segments, v.checkpoints, v.last_seq, hex::encode(v.head)
                );
            }
        }
        AuditCommand::Export {
            log,
            since,
            until,
            token,
            event,
            format: _,
        } => {
            for (seq, r) in log.verified()?.records {
                let secs = r.time_ms / 1000;
                if since.is_some_and(|s| secs < s)
                    || until.is_some_and(|u| secs > u)
                    || token
                        .as_ref()
                        .is_some_and(|t| r.token_id.as_ref() != Some(t))
                    || event.as_ref().is_some_and(|e| &r.event != e)
                {
                    continue;
                }
                print(seq, &r)?;
            }
        }
        AuditCommand::Tail { log, lines, follow } => {
            let v = log.verified()?;
            let skip = v.records.len().saturating_sub(lines);
            let mut shown = v.records.len() as u64;
            for (seq, r) in v.records.iter().skip(skip) {
                print(*seq, r)?;
            }
            if follow {
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    let v = log.verified()?;
                    for (seq, r) in v.records.iter().filter(|(s, _)| *s > shown) {
                        print(*seq, r)?;
                    }
                    shown = v.records.len() as u64;
                }
            }
        }
        AuditCommand::Report { log } => report(&log.verified()?),
        AuditCommand::Shred {
            log,
            before_epoch,
            older_than,
            yes,
        } => shred(&log, before_epoch, older_than, yes)?,
        AuditCommand::Hmac { text, state_dir } => {
            let state = crate::state_dir::resolve(state_dir)?;
            let dir = audit::audit_dir(&state);
            let path = dir.join(audit::keys::PSEUDONYM_KEY);
            if !path.exists() {
                return Err(format!(
                    "{}: no pseudonym key (has a server run here?)",
                    path.display()
                )
                .into());
            }
            let key = audit::keys::pseudonym_key(&dir)?;
            println!("{}", audit::keys::pseudonym(&key, &text));
        }
    }
    Ok(())
}

fn shred(
    log: &LogArgs,
    before_epoch: Option<u32>,
    older_than: Option<u64>,
    yes: bool,
) -> CmdResult {
    let (dir, key) = log.open()?;
    let before = match (before_epoch, older_than) {
        (Some(e), _) => e,
        (None, Some(age)) => retention::epoch_for_age(
            &dir,
            audit::now_ms().saturating_sub(age.saturating_mul(1000)),
        )?,
        (None, None) => return Err("pass --before-epoch or --older-than".into()),
    };
    let plan = retention::plan(&dir, &key, before)?;
    let what = format!(
        "epochs {}..{} ({} segment files, {} records)",
        key.epoch.max(1),
        before - 1,
        plan.segments.len(),
        plan.records
    );
    if !yes {
        println!(
            "would shred {what}; the read key would become epoch {before}'s. Pass --yes to do it."
        );
        return Ok(());
    }
    let key_path = log.key_path()?;
    retention::execute(&dir, &key, &key_path, &plan)?;
    let mut r = AuditRecord::event("audit_shredded").with_detail(format!(
        "{what} shredded; the log now starts at epoch {before}"
    ));
    r.outcome = Some("ok".into());
    super::record_admin(log.state_dir.as_deref(), r)?;
    println!(
        "shredded {what}; {} now holds epoch {before}'s read key: destroy every other copy of the old one",
        key_path.display()
    );
    Ok(())
}

fn report(v: &verify::Verified) {
    #[derive(Default)]
    struct PerToken {
        requests: u64,
        refused: u64,
        rate_limited: u64,
        completion_tokens: u64,
    }
    let mut events: BTreeMap<&str, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut tokens: BTreeMap<&str, PerToken> = BTreeMap::new();
    let mut unauth_clients: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, r) in &v.records {
        *events.entry(&r.event).or_default() += 1;
        if let Some(o) = &r.outcome {
            *outcomes.entry(o).or_default() += 1;
        }
        if r.event == "request" {
            let outcome = r.outcome.as_deref().unwrap_or("");
            if outcome == "refused_unauthenticated" {
                *unauth_clients
                    .entry(r.client.as_deref().unwrap_or("?"))
                    .or_default() += 1;
            }
            if let Some(t) = &r.token_id {
                let e = tokens.entry(t).or_default();
                e.requests += 1;
                e.refused += u64::from(outcome.starts_with("refused"));
                e.rate_limited += u64::from(outcome == "refused_rate_limited");
                e.completion_tokens += r.completion_tokens.unwrap_or(0);
            }
        }
    }
    let first = v.records.first().map_or(0, |(_, r)| r.time_ms / 1000);
    let last = v.records.last().map_or(0, |(_, r)| r.time_ms / 1000);
    println!(
        "audit report: {} records (verified), unix {first} .. {last}",
        v.records.len()
    );
    println!("\nevents:");
    for (e, n) in &events {
        println!("  {e:<28} {n}");
    }
    println!("\noutcomes:");
    for (o, n) in &outcomes {
        println!("  {o:<28} {n}");
    }
    println!("\nper token (id: requests, refused, rate limited, generated tokens):");
    for (t, p) in &tokens {
        println!(
            "  {t}: {} requests, {} refused, {} rate limited, {} tokens",
            p.requests, p.refused, p.rate_limited, p.completion_tokens
        );
    }
    println!("\nunauthenticated requests per client (pseudonym):");
    for (c, n) in &unauth_clients {
        let flag = if *n >= 10 { "  <- burst" } else { "" };
        println!("  {c}: {n}{flag}");
    }
    if !v.torn.is_empty() {
        println!("\ntorn tails (crashes during a write):");
        for t in &v.torn {
            println!("  {t}");
        }
    }
}
