//! A real server for one test, with short timeouts, plus raw-socket helpers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{p, securerun};

pub const SMOL: &str = "smollm2-135m-instruct";

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub state: PathBuf,
}

impl Server {
    /// Starts `securerun serve MODEL` with `config` (TOML) on an ephemeral loopback port.
    pub fn start(model: &Path, state: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        Self::start_with(model, state, config, env, &["--allow-unsigned"])
    }

    /// [`Self::start`] with other `serve` arguments instead of `--allow-unsigned`.
    pub fn start_with(
        model: &Path,
        state: &Path,
        config: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Server {
        let cfg = state.join("serve.toml");
        std::fs::create_dir_all(state).unwrap();
        std::fs::write(&cfg, format!("listen = \"127.0.0.1:0\"\n{config}")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_securerun"));
        cmd.args(["serve", p(model), "--state-dir", p(state)])
            .args(args)
            .args(["--config", p(&cfg)])
            .env("SECURERUN_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("listening on"),
            "server did not start: {line:?}"
        );
        let addr = line.split_whitespace().nth(2).unwrap();
        let addr = addr.split("://").nth(1).unwrap().parse().unwrap();
        Server {
            child,
            addr,
            state: state.to_path_buf(),
        }
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }

    /// Stops the server, then checks its audit log: it verifies, and `check` sees every record.
    pub fn stop_after(self, check: impl FnOnce(&[serde_json::Value])) {
        let state = self.state.clone();
        self.stop();
        let o = securerun(&[
            "audit",
            "verify",
            "--trust-local-key",
            "--state-dir",
            p(&state),
        ]);
        assert!(
            o.status.success(),
            "audit verify: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let records = records_of(&state);
        check(&records);
    }

    pub fn token(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "token",
            "create",
            "--name",
            name,
            "--state-dir",
            p(&self.state),
        ];
        args.extend_from_slice(extra);
        let o = securerun(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The running server picks it up within a quarter of a second.
        std::thread::sleep(Duration::from_millis(600));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_string()
    }
}

/// Every audit record in `state`'s log, decrypted and verified.
pub fn records_of(state: &Path) -> Vec<serde_json::Value> {
    let o = securerun(&[
        "audit",
        "export",
        "--format",
        "jsonl",
        "--trust-local-key",
        "--state-dir",
        p(state),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A raw HTTP/1.1 request; returns the connected socket (response unread).
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> TcpStream {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(request(method, path, token, body).as_bytes())
        .unwrap();
    conn
}

/// One HTTP/1.1 request that closes its connection.
fn request(method: &str, path: &str, token: Option<&str>, body: &str) -> String {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Status and body of a complete HTTP/1.1 exchange.
/// [`call`] that reports a refused or reset connection instead of panicking.
pub fn try_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect(addr)?;
    conn.write_all(request(method, path, token, body).as_bytes())?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut out = Vec::new();
    conn.read_to_end(&mut out)?;
    if out.is_empty() {
        return Err(std::io::ErrorKind::ConnectionReset.into());
    }
    Ok(parse(&out))
}

pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut conn = send(addr, method, path, token, body);
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    parse(&out)
}

pub fn parse(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// A prompt SmolLM2 continues greedily for thousands of tokens at every precision (it counts
/// on), for tests that need a generation still running seconds later. (A prose prompt such as
/// "Count from one to one thousand" reaches an end-of-sequence token within a few seconds once
/// decoding is fast.)
pub const LONG_PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,";

pub fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({"model": SMOL, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream})
    .to_string()
}

/// Waits until `f` holds, up to `limit`.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// `/metrics` value of `name`.
pub fn metric(addr: SocketAddr, token: &str, name: &str) -> u64 {
    let (status, body) = call(addr, "GET", "/metrics", Some(token), "");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("securerun_{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        .trim()
        .parse()
        .unwrap()
}

/// `/metrics` value of `name` for the SmolLM2 model (label `model`).
pub fn model_metric(addr: SocketAddr, token: &str, name: &str) -> u64 {
    metric(addr, token, &format!("{name}{{model=\"{SMOL}\"}}"))
}

/// A fake worker: a Python program that speaks the frame protocol and behaves as `script` says
/// after loading (`r = read()` gets the next request).
pub fn fake_worker(dir: &Path, name: &str, script: &str) -> PathBuf {
    fake_worker_ready(dir, name, "{'type': 'ready'}", script)
}

/// [`fake_worker`] with its own ready message (`ready`, a Python dict literal).
pub fn fake_worker_ready(dir: &Path, name: &str, ready: &str, script: &str) -> PathBuf {
    let python = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap().trim().to_string();
    let path = dir.join(format!("worker-{name}.py"));
    let body = format!(
        "#!{python}\nimport os, struct, json, time\nch = os.fdopen(3, 'r+b', buffering=0)\n\
         def frame(payload, version=1):\n    ch.write(struct.pack('<I', len(payload) + 1) + bytes([version]) + payload)\n\
         def msg(obj):\n    frame(json.dumps(obj).encode())\n\
         def readn(n):\n    b = b''\n    while len(b) < n:\n        c = ch.read(n - len(b))\n        if not c: raise SystemExit(0)\n        b += c\n    return b\n\
         def read():\n    n = struct.unpack('<I', readn(4))[0]\n    return json.loads(readn(n)[1:])\n\
         msg({{'type': 'confined', 'layers': []}})\nread()\nmsg({ready})\n{script}\n"
    );
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// Total size of the files in `dir` (the audit log's growth).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}
