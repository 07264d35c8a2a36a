//! `securerun audit ...`: creating, verifying, reading, anchoring and retaining the audit log.
//!
//! Trust comes from outside the directory being checked: the root public key (`--public
//! audit.pub`) and the read key (`--key read.key`) are passed in; keys found in the directory
//! itself are used only with `--trust-local-key`, which says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::CmdResult;
use crate::audit::checkpoint::{self, Checkpoint};
use crate::audit::{self, recipient, retention, verify, AuditRecord, ReadKey, Recipient};
use crate::signing::PublicKey;

#[derive(Args, Clone)]
pub struct LogArgs {
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// An audit directory to check instead of the state directory's (a copy, an archive).
    #[arg(long, value_name = "AUDIT_DIR", conflicts_with = "state_dir")]
    dir: Option<PathBuf>,
    /// The root public key (audit.pub as handed to the auditor, kept off the host).
    #[arg(long, value_name = "AUDIT.PUB")]
    public: Option<PathBuf>,
    /// The read key (kept off the host): decrypts records.
    #[arg(long, value_name = "READ.KEY")]
    key: Option<PathBuf>,
    /// Trust audit.pub (and read.key, if present) found in the audit directory itself. Whoever
    /// can write that directory can then forge the whole log: for a quick local look only.
    #[arg(long)]
    trust_local_key: bool,
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
    /// Make a read key for an auditor (on the auditor's machine): writes the secret to --out
    /// and prints the recipient line to give the operator (`audit init --recipient`).
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Create the audit log for an auditor's recipient key, so that no read key is ever on
    /// this host. (Without --recipient, a read key is made here, to be moved off.)
    Init {
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long, value_name = "RECIPIENT.PUB")]
        recipient: Option<PathBuf>,
    },
    /// Wrap epochs from the next one on to another auditor key (rotation; see `audit shred`).
    Recipient {
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        file: PathBuf,
    },
    /// Verify every checkpoint and record; exit non-zero with the first bad position.
    Verify {
        #[command(flatten)]
        log: LogArgs,
        /// Signed heads kept elsewhere (checkpoint sink file, journal or syslog extract, the
        /// output of `audit anchor`): the log must still contain each of them.
        #[arg(long, value_name = "FILE")]
        anchor: Vec<PathBuf>,
    },
    /// Print the latest signed head (one JSON line) for storing elsewhere, e.g. from cron.
    Anchor {
        #[command(flatten)]
        log: LogArgs,
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
        /// One data subject's records (an access request): a client pseudonym (see `audit
        /// hmac`) or a token id.
        #[arg(long, value_name = "PSEUDONYM")]
        subject: Option<String>,
        /// jsonl: the records as they are (with seq, time and attestation); ocsf: OCSF 1.1
        /// API Activity events (class 6003), one per line, for SIEMs that ingest OCSF.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "ocsf"])]
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
    /// Retention: overwrite and delete the segments and wrapped keys of every epoch before a
    /// point, on a log that verifies. Without --yes, only says what it would do.
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
        #[arg(long)]
        yes: bool,
    },
    /// Convert a log of the old format: verify it with its read key, keep it aside (it still
    /// verifies read-only with `audit verify --dir`), start a new log that records where the
    /// old one ended.
    Migrate {
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The old log's read key.
        #[arg(long, value_name = "READ.KEY")]
        key: PathBuf,
        /// The new log's auditor recipient (else a read key is made on the host).
        #[arg(long, value_name = "RECIPIENT.PUB")]
        recipient: Option<PathBuf>,
    },
    /// The keyed HMAC of a text or client address, to search an export made with
    /// `--audit-content hmac` (or the `client` field) for it; with `--end-user`, of an end
    /// user's identifier as requests name it (`user`), to find the `end_user` field.
    Hmac {
        text: String,
        #[arg(long)]
        end_user: bool,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

impl LogArgs {
    fn dir(&self) -> Result<PathBuf, crate::trust::TrustError> {
        if let Some(d) = &self.dir {
            return Ok(d.clone());
        }
        let state = crate::state_dir::resolve(self.state_dir.clone())?;
        Ok(audit::audit_dir(&state))
    }

    /// The root key: passed in, or the directory's own with --trust-local-key.
    fn root(&self, dir: &Path) -> Result<PublicKey, Box<dyn std::error::Error>> {
        match (&self.public, self.trust_local_key) {
            (Some(p), _) => Ok(checkpoint::read_root(p)?),
            (None, true) => {
                eprintln!(
                    "warning: trusting {} from the directory being verified: whoever can write it can forge the whole log; pass --public with the copy kept off the host",
                    checkpoint::ROOT_PUB
                );
                Ok(checkpoint::read_root(&dir.join(checkpoint::ROOT_PUB))?)
            }
            (None, false) => Err(format!(
                "pass --public AUDIT.PUB (the root key kept off this host); --trust-local-key uses {}",
                dir.join(checkpoint::ROOT_PUB).display()
            )
            .into()),
        }
    }

    fn read_key(&self, dir: &Path) -> Result<Option<ReadKey>, Box<dyn std::error::Error>> {
        let local = dir.join(recipient::READ_KEY);
        match (&self.key, self.trust_local_key) {
            (Some(k), _) => Ok(Some(ReadKey::load(k)?)),
            (None, true) if local.exists() => Ok(Some(ReadKey::load(&local)?)),
            _ => Ok(None),
        }
    }

    /// Verifies (with progress on long logs) and returns the result.
    fn verified(
        &self,
        anchors: &[Checkpoint],
        need_read: bool,
    ) -> Result<verify::Verified, Box<dyn std::error::Error>> {
        let dir = self.dir()?;
        let root = self.root(&dir)?;
        let read = self.read_key(&dir)?;
        if need_read && read.is_none() {
            return Err("pass --key READ.KEY (the auditor's read key) to read records".into());
        }
        let material = verify::Material {
            root: &root,
            read: read.as_ref(),
            anchors,
        };
        let started = std::time::Instant::now();
        let mut last = started;
        let v = verify::verify(&dir, &material, |e, of| {
            if last.elapsed() >= std::time::Duration::from_secs(1) {
                last = std::time::Instant::now();
                eprintln!("verifying epoch {e} of {of}...");
            }
        })?;
        Ok(v)
    }
}

/// One exported record: the record, its sequence number and its time in RFC 3339.
fn print(seq: u64, r: &AuditRecord) -> Result<(), Box<dyn std::error::Error>> {
    print_attested(seq, r, true)
}

/// [`print`], marking a record no signed head covers yet (`"attested": false`): until the
/// next checkpoint, the host alone vouches for it.
fn print_attested(
    seq: u64,
    r: &AuditRecord,
    attested: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut v = serde_json::to_value(r)?;
    if !attested {
        v["attested"] = false.into();
    }
    v["seq"] = seq.into();
    if let Ok(t) = jiff::Timestamp::from_millisecond(r.time_ms as i64) {
        v["time"] = t.to_string().into();
    }
    println!("{v}");
    Ok(())
}

fn time(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

pub fn run(cmd: AuditCommand) -> CmdResult {
    match cmd {
        AuditCommand::Keygen { out } => {
            if out.exists() {
                return Err(format!("{}: exists; not overwriting a key", out.display()).into());
            }
            let k = ReadKey::generate();
            k.store(&out)?;
            eprintln!(
                "wrote the read key to {} (keep it secret, off the audited host); give this line to the operator as recipient.pub:",
                out.display()
            );
            print!("{}", k.recipient().encode());
        }
        AuditCommand::Init {
            state_dir,
            recipient,
        } => {
            let state = crate::state_dir::resolve(state_dir)?;
            let dir = audit::audit_dir(&state);
            let r = recipient.as_deref().map(Recipient::load).transpose()?;
            match audit::init(&dir, r)? {
                audit::Created::Existing => {
                    return Err(format!("{}: an audit log exists already", dir.display()).into())
                }
                created => super::report_created(&dir, created),
            }
        }
        AuditCommand::Recipient { state_dir, file } => {
            let state = crate::state_dir::resolve(state_dir.clone())?;
            let dir = audit::audit_dir(&state);
            let r = Recipient::load(&file)?;
            let mut rec = AuditRecord::event("audit_recipient_changed").with_detail(format!(
                "epochs from the next one on are wrapped to {}",
                hex::encode(r.0)
            ));
            rec.outcome = Some("ok".into());
            super::record_admin(Some(&state), rec)?;
            crate::state_dir::write_public(&dir.join(recipient::RECIPIENT), r.encode().as_bytes())?;
            eprintln!(
                "the next epoch (next server start or rotation) is wrapped to the new recipient"
            );
        }
        AuditCommand::Verify { log, anchor } if audit::v1::is_v1(&log.dir()?) => {
            if !anchor.is_empty() {
                return Err("a log of the old format takes no --anchor".into());
            }
            verify_v1(&log)?;
        }
        AuditCommand::Verify { log, anchor } => {
            let mut anchors = Vec::new();
            for a in &anchor {
                anchors.extend(verify::read_anchors(a)?);
            }
            let v = log.verified(&anchors, false)?;
            for n in &v.notes {
                eprintln!("note: {n}");
            }
            let decrypted = if v.records.is_empty() && v.count > 0 {
                "chained against signed checkpoints (nothing decrypted: pass --key to read)"
            } else {
                "decrypted, authenticated and chained against signed checkpoints"
            };
            println!(
                "ok: {} records in {} segments {decrypted}; {} signed checkpoints and {} anchors agree; epochs {}..{}, head {}:{}",
                v.count,
                v.segments,
                v.checkpoints,
                v.anchors,
                v.first_epoch,
                v.open_epoch,
                v.last_seq,
                hex::encode(v.head)
            );
            let when = v.attested_time_ms.map(time).unwrap_or_else(|| "-".into());
            println!(
                "guarantee: records {}..{} are attested by a signed head (the newest from {when}); {} records after it are not yet attested",
                v.first_seq + 1,
                v.attested_seq,
                v.last_seq - v.attested_seq.min(v.last_seq)
            );
            if !v.anchored {
                println!(
                    "without an anchor newer than the log's last signed head, removal of the newest epochs (with their handover) cannot be excluded: pass --anchor with heads kept off the host (checkpoint sink, audit anchor)"
                );
            }
        }
        AuditCommand::Anchor { log } => {
            let dir = log.dir()?;
            let root = log.root(&dir)?;
            let epochs = checkpoint::walk(&dir, &root, |_| {})?;
            let newest = epochs
                .iter()
                .rev()
                .find_map(|e| e.checkpoints.last())
                .ok_or("no signed head yet")?;
            print!("{}", newest.to_line());
        }
        AuditCommand::Export {
            log,
            since,
            until,
            token,
            event,
            subject,
            format,
        } => {
            let v = log.verified(&[], true)?;
            for (seq, r) in v.records {
                let secs = r.time_ms / 1000;
                if since.is_some_and(|s| secs < s)
                    || until.is_some_and(|u| secs > u)
                    || token
                        .as_ref()
                        .is_some_and(|t| r.token_id.as_ref() != Some(t))
                    || event.as_ref().is_some_and(|e| &r.event != e)
                    || subject.as_ref().is_some_and(|s| {
                        r.client.as_ref() != Some(s)
                            && r.token_id.as_ref() != Some(s)
                            && r.end_user.as_ref() != Some(s)
                    })
                {
                    continue;
                }
                if format == "ocsf" {
                    let Ok(serde_json::Value::Object(mut fields)) = serde_json::to_value(&r) else {
                        return Err("a record did not serialize".into());
                    };
                    // Which record of the log, and whether a checkpoint attests it yet.
                    fields.insert("seq".into(), seq.into());
                    fields.insert("attested".into(), (seq <= v.attested_seq).into());
                    println!("{}", crate::audit::stream::ocsf(fields));
                } else {
                    print_attested(seq, &r, seq <= v.attested_seq)?;
                }
            }
        }
        AuditCommand::Tail { log, lines, follow } => {
            let v = log.verified(&[], true)?;
            let skip = v.records.len().saturating_sub(lines);
            let mut shown = v.last_seq;
            for (seq, r) in v.records.iter().skip(skip) {
                print(*seq, r)?;
            }
            if follow {
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    let v = log.verified(&[], true)?;
                    for (seq, r) in v.records.iter().filter(|(s, _)| *s > shown) {
                        print(*seq, r)?;
                    }
                    shown = v.last_seq;
                }
            }
        }
        AuditCommand::Report { log } => report(&log.verified(&[], true)?),
        AuditCommand::Shred {
            log,
            before_epoch,
            older_than,
            yes,
        } => shred(&log, before_epoch, older_than, yes)?,
        AuditCommand::Migrate {
            state_dir,
            key,
            recipient,
        } => migrate(state_dir, &key, recipient.as_deref())?,
        AuditCommand::Hmac {
            text,
            end_user,
            state_dir,
        } => {
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
            let text = match end_user {
                true => audit::keys::end_user_text(&text),
                false => text,
            };
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
    let dir = log.dir()?;
    let root = log.root(&dir)?;
    let before = match (before_epoch, older_than) {
        (Some(e), _) => e,
        (None, Some(age)) => retention::epoch_for_age(
            &dir,
            &root,
            audit::now_ms().saturating_sub(age.saturating_mul(1000)),
        )?,
        (None, None) => return Err("pass --before-epoch or --older-than".into()),
    };
    let plan = retention::plan(&dir, &root, before)?;
    let what = format!(
        "epochs {}..{} ({} files, {} records)",
        plan.epochs.0,
        plan.epochs.1,
        plan.files.len(),
        plan.records
    );
    if !yes {
        println!("would shred {what}. Pass --yes to do it.");
        return Ok(());
    }
    // Recorded first: a shredding that cannot be recorded does not happen.
    let mut r = AuditRecord::event("audit_shredded")
        .with_detail(format!("{what}; the log now starts at epoch {before}"));
    r.outcome = Some("ok".into());
    r.epoch = Some(before);
    if super::record_admin_in(&dir, r)? == audit::spool::Recorded::Spooled {
        // A running server holds the log: it records the shredding and signs where the log
        // now begins; nothing is deleted before that signature is on disk.
        let started = std::time::Instant::now();
        loop {
            let epochs = checkpoint::walk(&dir, &root, |_| {})?;
            if retention::retained_from(&epochs) >= before {
                break;
            }
            if started.elapsed() > std::time::Duration::from_secs(15) {
                return Err("not done: the running server did not record the shredding within 15 s (nothing was deleted)".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    retention::execute(&dir, &plan)?;
    println!("shredded {what}");
    Ok(())
}

/// A log of the old format, verified read-only with its own read key or root.
fn verify_v1(log: &LogArgs) -> CmdResult {
    use audit::v1;
    let dir = log.dir()?;
    let access = match (&log.key, &log.public) {
        (Some(k), _) => v1::verify::Access::Read(v1::keys::EpochKey::load(k)?),
        (None, Some(p)) => v1::verify::Access::Integrity(crate::trust::read_key(p)?),
        (None, None) => {
            return Err(
                "a log of the old format: pass its read key (--key) or audit.pub (--public)".into(),
            )
        }
    };
    let v = v1::verify::verify_with(&dir, &access, None)?;
    if v.segments == 0 || v.checkpoints == 0 {
        return Err(format!(
            "audit log invalid at {}: no segments or no signed checkpoints (an empty or removed log is not a valid one)",
            dir.display()
        )
        .into());
    }
    println!(
        "ok (old format, read-only): {} records in {} segments, {} signed checkpoints agree; head {}:{}; convert it with securerun audit migrate",
        v.count,
        v.segments,
        v.checkpoints,
        v.last_seq,
        hex::encode(v.head)
    );
    Ok(())
}

fn migrate(state_dir: Option<PathBuf>, key: &Path, recipient: Option<&Path>) -> CmdResult {
    let state = crate::state_dir::resolve(state_dir)?;
    let dir = audit::audit_dir(&state);
    if !audit::v1::is_v1(&dir) {
        return Err(format!("{}: not a log of the old format", dir.display()).into());
    }
    let old_key = audit::v1::keys::EpochKey::load(key)?;
    let v = audit::v1::verify::verify(&dir, &old_key)
        .map_err(|e| format!("not migrating: the old log does not verify: {e}"))?;
    let archive = state.join(format!("audit-v1-{}", audit::now_ms()));
    std::fs::rename(&dir, &archive)?;
    let r = recipient.map(Recipient::load).transpose()?;
    let created = audit::init(&dir, r)?;
    super::report_created(&dir, created);
    let mut rec = AuditRecord::event("audit_migrated").with_detail(format!(
        "the log of the old format ({} records, head {}:{}) was verified and kept at {} (verify it with: securerun audit verify --dir {} --key OLD_READ_KEY)",
        v.count,
        v.last_seq,
        hex::encode(v.head),
        archive.display(),
        archive.display()
    ));
    rec.outcome = Some("ok".into());
    rec.count = Some(v.count);
    super::record_admin(Some(&state), rec)?;
    println!(
        "migrated: the old log ({} records) is at {}; the new log starts in {}",
        v.count,
        archive.display(),
        dir.display()
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
    if !v.notes.is_empty() {
        println!("\nnotes:");
        for t in &v.notes {
            println!("  {t}");
        }
    }
}
