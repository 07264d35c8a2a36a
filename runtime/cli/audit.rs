//! `securerun audit verify|export|tail|report`: reading the audit log with the epoch-0 key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::CmdResult;
use crate::audit::{self, verify, AuditRecord, EpochKey};

#[derive(Args, Clone)]
pub struct LogArgs {
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The epoch-0 read key (default: read.key in the audit directory).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify every record; exit non-zero with the first bad position.
    Verify {
        #[command(flatten)]
        log: LogArgs,
        /// A head printed by an earlier verify (`SEQ:HASH`): the log must still contain it.
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Option<String>,
    },
    /// Export verified records, decrypted, one JSON object per line.
    Export {
        #[command(flatten)]
        log: LogArgs,
        /// Unix seconds.
        #[arg(long)]
        since: Option<u64>,
        /// Unix seconds.
        #[arg(long)]
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
    /// The keyed HMAC of a text or client address, to search an export made with
    /// `--audit-content hmac` (or the `client` field) for it.
    Hmac {
        text: String,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

impl LogArgs {
    fn open(&self) -> Result<(PathBuf, EpochKey), Box<dyn std::error::Error>> {
        let state = self
            .state_dir
            .clone()
            .or_else(crate::trust::default_state_dir)
            .ok_or(crate::trust::TrustError::NoStateDir)?;
        let dir = audit::audit_dir(&state);
        let key_path = self
            .key
            .clone()
            .unwrap_or_else(|| dir.join(audit::keys::READ_KEY));
        Ok((dir, EpochKey::load(&key_path)?))
    }

    fn verified(&self) -> Result<verify::Verified, Box<dyn std::error::Error>> {
        let (dir, key) = self.open()?;
        Ok(verify::verify(&dir, &key)?)
    }
}

fn print(seq: u64, r: &AuditRecord) -> Result<(), Box<dyn std::error::Error>> {
    let mut v = serde_json::to_value(r)?;
    v["seq"] = seq.into();
    println!("{v}");
    Ok(())
}

pub fn run(cmd: AuditCommand) -> CmdResult {
    match cmd {
        AuditCommand::Verify { log, anchor } => {
            let v = log.verified()?;
            if let Some(anchor) = anchor {
                let (seq, hash) = anchor
                    .split_once(':')
                    .ok_or("--anchor is SEQ:HASH as printed by audit verify")?;
                let seq: u64 = seq.parse().map_err(|_| "--anchor: bad sequence number")?;
                let count = v.records.len() as u64;
                if count < seq {
                    return Err(format!("audit log invalid: it ends at record {count}, before the anchor's record {seq} (records were cut off the end)").into());
                }
                // Every record was just authenticated; the anchor pins how far the log went.
                let (dir, _) = log.open()?;
                let at = verify::head_at(&dir, seq)?;
                if !at.eq_ignore_ascii_case(hash) {
                    return Err(format!("audit log invalid: the head at record {seq} is {at}, not the anchor's {hash}").into());
                }
            }
            for t in &v.torn {
                eprintln!(
                    "note: {t} (a crash during a write; every complete record before it verified)"
                );
            }
            println!(
                "ok: {} records in {} segments verified; head {}:{}",
                v.records.len(),
                v.segments,
                v.records.len(),
                hex::encode(v.head)
            );
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
        AuditCommand::Hmac { text, state_dir } => {
            let state = state_dir
                .or_else(crate::trust::default_state_dir)
                .ok_or(crate::trust::TrustError::NoStateDir)?;
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
