//! A real server, real CLI commands, and the auditor's off-host material.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::{self, p, securerun};
use securerun::audit::segment;

pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    pub fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert!(self.child.wait().unwrap().success());
    }
}

/// A test that fails leaves no server behind (a stopped one is already reaped: nothing happens).
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a server for MiniLM; `fsize` caps the files it may write (RLIMIT_FSIZE).
pub fn serve(state: &Path, fsize: Option<u64>) -> Result<Server, String> {
    serve_with(state, fsize, &[])
}

pub fn serve_with(state: &Path, fsize: Option<u64>, extra: &[&str]) -> Result<Server, String> {
    serve_env(state, fsize, extra, &[])
}

/// [`serve_with`] with extra environment variables for the server.
pub fn serve_env(
    state: &Path,
    fsize: Option<u64>,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> Result<Server, String> {
    spawn(state, fsize, extra, env, None)
}

/// A server whose log (at `level`) goes to the file `log`.
pub fn serve_logging(state: &Path, level: &str, log: &Path) -> Server {
    serve_logging_with(state, level, log, &[])
}

/// [`serve_logging`] with extra flags.
pub fn serve_logging_with(state: &Path, level: &str, log: &Path, extra: &[&str]) -> Server {
    spawn(state, None, extra, &[], Some((level, log))).unwrap()
}

fn spawn(
    state: &Path,
    fsize: Option<u64>,
    extra: &[&str],
    env: &[(&str, &Path)],
    log: Option<(&str, &Path)>,
) -> Result<Server, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_securerun"));
    cmd.envs(env.iter().map(|(k, v)| (*k, *v)));
    cmd.args([
        "serve",
        p(&common::minilm()),
        "--allow-unsigned",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .args(["--state-dir", p(state)])
    .stdout(Stdio::piped());
    match log {
        Some((level, file)) => {
            cmd.env("SECURERUN_LOG", level)
                .stderr(std::fs::File::create(file).unwrap());
        }
        // Nobody reads stderr while the server runs: keep it quiet so the pipe never fills.
        None => {
            cmd.env("SECURERUN_LOG", "off").stderr(Stdio::piped());
        }
    }
    if let Some(limit) = fsize {
        // SAFETY: async-signal-safe calls only, in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                // The default SIGXFSZ disposition (terminate) stays: the server itself must turn
                // the limit into an EFBIG error it handles, not die of it.
                libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if !line.starts_with("listening on") {
        let out = child.wait_with_output().unwrap();
        let logged = log.map(|(_, f)| std::fs::read_to_string(f).unwrap_or_default());
        return Err(logged.unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let url = line.split_whitespace().nth(2).unwrap();
    let addr = url.split_once("://").map_or(url, |(_, a)| a).to_string();
    Ok(Server { child, addr })
}

/// A raw HTTP/1.1 request; returns the status code.
pub fn call(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> u16 {
    call_full(addr, method, path, token, body).0
}

/// A raw HTTP/1.1 request; returns the status code and the body.
pub fn call_full(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Like [`call`], returning the status and the `x-request-id` header (None on a dropped
/// connection).
pub fn call_with_id(addr: &str, token: &str, body: &str) -> Option<(u16, Option<String>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .map(|v| v.trim().to_string());
    Some((status, id))
}

/// An embeddings request that must succeed.
pub fn embeds(addr: &str, token: &str, text: &str) {
    assert_eq!(
        call(
            addr,
            "POST",
            "/v1/embeddings",
            Some(token),
            &embed_body(text)
        ),
        200
    );
}

pub fn embed_body(text: &str) -> String {
    serde_json::json!({"model": "all-minilm-l6-v2", "input": text}).to_string()
}

pub fn token(state: &Path, name: &str, scopes: &str) -> String {
    let o = securerun(&[
        "token",
        "create",
        "--name",
        name,
        "--scopes",
        scopes,
        "--state-dir",
        p(state),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

/// `securerun audit ARGS --state-dir STATE`.
pub fn audit(state: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["audit"];
    a.extend_from_slice(args);
    a.extend(["--state-dir", p(state)]);
    securerun(&a)
}

/// Every record of a log whose read key is still on the host (tests that are not about keys).
pub fn export_local(state: &Path) -> Vec<serde_json::Value> {
    parse_lines(&audit(state, &["export", "--trust-local-key"]))
}

/// A successful command's JSON lines.
fn parse_lines(o: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the auditor keeps off the host: `audit.pub` (copied when the log was made) and the
/// read key (moved off the host).
pub struct Auditor {
    _dir: tempfile::TempDir,
    pub public: PathBuf,
    pub key: PathBuf,
}

impl Auditor {
    pub fn take(state: &Path) -> Auditor {
        let dir = tempfile::tempdir().unwrap();
        let (public, key) = (dir.path().join("audit.pub"), dir.path().join("read.key"));
        std::fs::copy(state.join("audit/audit.pub"), &public).unwrap();
        std::fs::rename(state.join("audit/read.key"), &key).unwrap();
        Auditor {
            _dir: dir,
            public,
            key,
        }
    }

    /// Root and read key.
    pub fn full(&self) -> Vec<&str> {
        vec!["--public", p(&self.public), "--key", p(&self.key)]
    }

    /// The root alone (integrity, nothing decrypted).
    pub fn public_only(&self) -> Vec<&str> {
        vec!["--public", p(&self.public)]
    }

    pub fn verify(&self, state: &Path, extra: &[&str]) -> std::process::Output {
        let mut a = vec!["verify"];
        a.extend(self.full());
        a.extend_from_slice(extra);
        audit(state, &a)
    }

    pub fn export(&self, state: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut a = vec!["export"];
        a.extend(self.full());
        a.extend_from_slice(extra);
        parse_lines(&audit(state, &a))
    }

    /// Verify fails (with the root alone and with the read key), naming `needle`.
    pub fn detects(&self, state: &Path, extra: &[&str], needle: &str) -> String {
        self.detects_as(state, extra, needle, needle)
    }

    /// Verify fails with the root alone naming `public_needle`, and with the read key naming
    /// `key_needle` (a decrypting verifier can say more precisely what is wrong).
    pub fn detects_as(
        &self,
        state: &Path,
        extra: &[&str],
        public_needle: &str,
        key_needle: &str,
    ) -> String {
        let mut last = String::new();
        for (material, needle) in [
            (self.public_only(), public_needle),
            (self.full(), key_needle),
        ] {
            let mut a = vec!["verify"];
            a.extend(material.clone());
            a.extend_from_slice(extra);
            let o = audit(state, &a);
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(
                !o.status.success(),
                "{material:?}: manipulation not detected ({needle}): {}",
                String::from_utf8_lossy(&o.stdout)
            );
            assert!(
                err.contains(needle),
                "{material:?}: expected {needle:?} in: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            last = err;
        }
        last
    }

    pub fn passes(&self, state: &Path, extra: &[&str]) -> String {
        let o = self.verify(state, extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    }
}

pub const SECRET_TEXT: &str = "Patient 4711 reported chest pain at the pump station";

/// A mixed session: a token created with no server running (the CLI records it in epoch 2,
/// after the empty epoch 1 the log began with), then two server runs (epochs 3 and 4).
pub fn session() -> (tempfile::TempDir, String, Auditor) {
    session_with(&[])
}

pub fn session_with(extra: &[&str]) -> (tempfile::TempDir, String, Auditor) {
    let state = tempfile::tempdir().unwrap();
    let t = token(state.path(), "analyst", "embeddings");
    let auditor = Auditor::take(state.path());
    let body = embed_body(SECRET_TEXT);
    for _ in 0..2 {
        let s = serve_with(state.path(), None, extra).unwrap();
        assert_eq!(
            call(&s.addr, "POST", "/v1/embeddings", Some(&t), &body),
            200
        );
        assert_eq!(call(&s.addr, "POST", "/v1/embeddings", None, &body), 401);
        assert_eq!(call(&s.addr, "GET", "/metrics", Some(&t), ""), 403);
        assert_eq!(
            call(
                &s.addr,
                "POST",
                "/v1/embeddings",
                Some(&t),
                &"x".repeat(2 << 20)
            ),
            413
        );
        s.stop();
    }
    (state, t, auditor)
}

/// The contents of every file under `dir`.
pub fn raw_files(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(raw_files(&path));
        } else {
            out.push(std::fs::read(&path).unwrap());
        }
    }
    out
}

pub fn copy(state: &Path) -> tempfile::TempDir {
    let c = tempfile::tempdir().unwrap();
    common::copy_dir(&state.join("audit"), &c.path().join("audit"));
    c
}

pub fn seg(state: &Path, epoch: u32) -> PathBuf {
    state.join("audit").join(segment::segment_name(epoch))
}

pub fn cp(state: &Path, epoch: u32) -> PathBuf {
    state
        .join("audit")
        .join(segment::Kind::Checkpoints.name(epoch))
}

/// Frame boundaries of a segment: (offset, total length).
pub fn frames(path: &Path) -> Vec<(usize, usize)> {
    let mut r = segment::Reader::open(path).unwrap();
    let mut out = Vec::new();
    while let Ok(Some(f)) = r.next_frame().unwrap() {
        out.push((f.offset as usize, f.len_on_disk() as usize));
    }
    out
}

pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn write_lines(path: &Path, l: &[String]) {
    let text = if l.is_empty() {
        String::new()
    } else {
        l.join("\n") + "\n"
    };
    std::fs::write(path, text).unwrap();
}

/// The open epoch: the highest-numbered segment.
pub fn newest_epoch(state: &Path) -> u32 {
    std::fs::read_dir(state.join("audit"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
        })
        .max()
        .unwrap()
}

/// The secrets in a `current.key` file: (epoch, record key, checkpoint key).
pub fn epoch_secrets(path: &Path) -> (u32, [u8; 32], [u8; 32]) {
    let text = std::fs::read_to_string(path).unwrap();
    let parts: Vec<&str> = text.split_whitespace().collect();
    let bytes = |h: &str| <[u8; 32]>::try_from(hex::decode(h).unwrap()).unwrap();
    (parts[2].parse().unwrap(), bytes(parts[3]), bytes(parts[4]))
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
