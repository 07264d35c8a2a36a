//! Checkpoint sinks: every signed head, as it is made, also goes somewhere the host's own
//! files cannot reach back to, through mechanisms operators already run.
//!
//! - `file:PATH`: appended (and synced) to a file, e.g. on another mount or a network share.
//!   A write failure is an audit fault: the operator asked for an off-host copy, so the log
//!   does not go on without it (requests are refused until it works again).
//! - `syslog[:SOCKET]`: an RFC 5424 message to the local syslog socket (`/dev/log`), which a
//!   forwarding daemon ships elsewhere; facility `log audit` (13), severity info.
//! - `journald[:SOCKET]`: systemd-journald's native protocol on
//!   `/run/systemd/journal/socket`, with the checkpoint in the `SECURERUN_CHECKPOINT` field.
//!
//! Datagram sinks never block the writer (non-blocking sends); a failed send is counted in
//! `/metrics` (`securerun_audit_sink_errors_total`) and logged, since datagram delivery is not
//! acknowledged anyway. Each line carries the checkpoint JSON, so a file of such lines (or a
//! `journalctl -o cat` / syslog extract) is what `audit verify --anchor FILE` reads.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::checkpoint::Checkpoint;
use super::AuditError;

/// Where checkpoints are sent, as configured (`--checkpoint-sink`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    File(PathBuf),
    Syslog(PathBuf),
    Journald(PathBuf),
}

impl std::str::FromStr for SinkSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let path = |default: &str| PathBuf::from(if arg.is_empty() { default } else { arg });
        match kind {
            "file" if !arg.is_empty() => Ok(SinkSpec::File(PathBuf::from(arg))),
            "syslog" => Ok(SinkSpec::Syslog(path("/dev/log"))),
            "journald" => Ok(SinkSpec::Journald(path("/run/systemd/journal/socket"))),
            _ => Err(format!(
                "{s:?}: a checkpoint sink is file:PATH, syslog[:SOCKET] or journald[:SOCKET]"
            )),
        }
    }
}

/// The configured sinks, ready to send.
#[derive(Default)]
pub struct Sinks {
    specs: Vec<SinkSpec>,
    socket: Option<UnixDatagram>,
    pub errors: Arc<AtomicU64>,
}

impl Sinks {
    pub fn new(specs: Vec<SinkSpec>) -> Self {
        let socket = UnixDatagram::unbound().ok();
        if let Some(s) = &socket {
            let _ = s.set_nonblocking(true);
        }
        Sinks {
            specs,
            socket,
            errors: Arc::default(),
        }
    }

    /// Sends `c` everywhere; only a file sink's failure is returned (see the module docs).
    pub fn send(&self, c: &Checkpoint) -> Result<(), AuditError> {
        let json = c.to_line();
        let json = json.trim_end();
        let mut result = Ok(());
        for spec in &self.specs {
            let sent = match spec {
                SinkSpec::File(path) => {
                    let r = append_line(path, json);
                    if let Err(e) = &r {
                        result = Err(AuditError::Io(format!(
                            "checkpoint sink {}: {e}",
                            path.display()
                        )));
                    }
                    r
                }
                SinkSpec::Syslog(socket) => {
                    self.datagram(socket, syslog_line("audit-checkpoint", json).as_bytes())
                }
                SinkSpec::Journald(socket) => self.datagram(socket, journal_entry(json).as_bytes()),
            };
            if let Err(e) = sent {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sink = ?spec, error = %e, "audit checkpoint sink failed");
            }
        }
        result
    }

    /// Whether every file sink can be opened for appending now (checked every second, so an
    /// unwritable sink refuses requests at once, not at the next checkpoint).
    pub fn check_files(&self) -> Result<(), AuditError> {
        for spec in &self.specs {
            if let SinkSpec::File(path) = spec {
                open_append(path).map_err(|e| {
                    AuditError::Io(format!("checkpoint sink {}: {e}", path.display()))
                })?;
            }
        }
        Ok(())
    }

    fn datagram(&self, socket: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
        let s = self
            .socket
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no datagram socket"))?;
        s.send_to(bytes, socket).map(|_| ())
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(f)
}

fn append_line(path: &std::path::Path, json: &str) -> std::io::Result<()> {
    let mut f = open_append(path)?;
    f.write_all(format!("{json}\n").as_bytes())?;
    f.sync_data()
}

/// RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG`; facility 13 (log
/// audit), severity 6 (info) → PRI 110; the hostname is left nil (the relay adds its own).
/// `msgid` says what the message holds (`audit-checkpoint`, `audit-record`).
pub(super) fn syslog_line(msgid: &str, json: &str) -> String {
    let time = jiff::Timestamp::now()
        .round(jiff::Unit::Millisecond)
        .unwrap_or(jiff::Timestamp::now());
    format!(
        "<110>1 {time} - securerun {} {msgid} - {json}",
        std::process::id()
    )
}

/// journald's native protocol: `FIELD=value` lines (the JSON holds no newline).
fn journal_entry(json: &str) -> String {
    format!(
        "MESSAGE=securerun audit checkpoint {json}\nPRIORITY=6\nSYSLOG_IDENTIFIER=securerun\nSECURERUN_CHECKPOINT={json}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_parse_and_reach_a_file_and_a_datagram_socket() {
        assert!("file:".parse::<SinkSpec>().is_err());
        assert!("nfs".parse::<SinkSpec>().is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("heads");
        let sock = dir.path().join("log.sock");
        let listener = UnixDatagram::bind(&sock).unwrap();
        let sinks = Sinks::new(vec![
            format!("file:{}", file.display()).parse().unwrap(),
            format!("syslog:{}", sock.display()).parse().unwrap(),
            format!("journald:{}", sock.display()).parse().unwrap(),
            "syslog:/nonexistent/socket".parse().unwrap(),
        ]);
        let k = super::super::keys::EpochSecrets::generate(1);
        let c = Checkpoint::sign(&k, 3, &[1; 32], &k.with_next_signing_key()).unwrap();
        sinks.send(&c).unwrap();
        assert_eq!(sinks.errors.load(Ordering::Relaxed), 1);
        let line = std::fs::read_to_string(&file).unwrap();
        assert_eq!(Checkpoint::from_line(&line), Some(c.clone()));
        let mut buf = [0u8; 4096];
        let n = listener.recv(&mut buf).unwrap();
        let syslog = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(syslog.starts_with("<110>1 "), "{syslog}");
        assert_eq!(Checkpoint::from_line(syslog), Some(c.clone()));
        let n = listener.recv(&mut buf).unwrap();
        let journal = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(journal.contains("SECURERUN_CHECKPOINT={"), "{journal}");
        // A file sink that cannot be written is an error the writer turns into a fault.
        let bad = Sinks::new(vec!["file:/proc/version/x".parse().unwrap()]);
        assert!(bad.send(&c).is_err());
    }
}
