//! Starting a worker process with exactly the descriptors it needs, and taking them on the
//! worker side.
//!
//! The child gets a cleared environment (plus the variables the caller names), stdin and stdout
//! on /dev/null, the IPC socket as fd 3 and the passed descriptors as fds 4, 5, ...; every other
//! descriptor is closed before `exec`. It dies with SIGKILL when the supervisor does
//! (`PR_SET_PDEATHSIG`, armed before `exec`; if the supervisor died before that, the child
//! does not start).
//!
//! The parent-death signal is tied to the *thread* that spawned the worker: spawn from a thread
//! that lives as long as the worker should (the main thread, or a long-lived engine thread,
//! never a pool thread that may be retired while the worker runs).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::frame::Channel;

/// The worker's end of the IPC socket.
pub const CHANNEL_FD: RawFd = 3;
/// The first descriptor passed with [`WorkerSpec::fds`].
pub const FIRST_PASSED_FD: RawFd = 4;
/// Environment variable with the supervisor's pid, so that the worker can check its parent is
/// still the one that started it if it must arm the parent-death signal again.
pub const SUPERVISOR_PID_ENV: &str = "SECURERUN_SUPERVISOR_PID";

/// What to start.
pub struct WorkerSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The only environment variables the worker sees (besides [`SUPERVISOR_PID_ENV`]).
    pub env: Vec<(OsString, OsString)>,
    /// Descriptors handed over, in order, as fds 4, 5, ...
    pub fds: Vec<OwnedFd>,
    /// Where the worker's stderr goes (null unless debugging).
    pub stderr: Stdio,
}

/// A started worker and the supervisor's end of its socket.
pub struct WorkerProcess {
    pub child: Child,
    pub channel: Channel,
}

/// Starts the worker.
pub fn spawn(spec: WorkerSpec) -> io::Result<WorkerProcess> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut sources: Vec<RawFd> = vec![theirs.as_raw_fd()];
    sources.extend(spec.fds.iter().map(|fd| fd.as_raw_fd()));
    // Captured before the fork: the child compares its parent with it.
    let supervisor = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(SUPERVISOR_PID_ENV, supervisor.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(spec.stderr);
    let targets_end = CHANNEL_FD + sources.len() as RawFd;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid, signal, fcntl, dup2, close_range) on integers and descriptor
    // numbers; it allocates nothing (`sources` was built before the fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            // Die with the supervisor; if it already died (we were reparented before the
            // signal was armed), do not start at all.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != supervisor {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // What a terminal or a signal to the whole process group sends (SIGHUP on a hangup
            // or `kill -HUP -PGID`, `systemctl kill`; SIGINT on Ctrl-C; SIGTERM to the group)
            // is the supervisor's to act on: it reloads or drains, and ends its workers itself
            // (SIGKILL, or the parent-death signal). Ignored dispositions survive exec, so the
            // child is never without them.
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            // First move every source above the target range, so that placing one cannot
            // overwrite another that is still to be placed.
            let mut high = [0 as RawFd; 64];
            if sources.len() > high.len() {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            for (i, &src) in sources.iter().enumerate() {
                let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, targets_end);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                high[i] = fd;
            }
            for (i, &fd) in high[..sources.len()].iter().enumerate() {
                // dup2 clears close-on-exec on the new descriptor.
                if libc::dup2(fd, CHANNEL_FD + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::syscall(
                libc::SYS_close_range,
                targets_end as libc::c_uint,
                libc::c_uint::MAX,
                0,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    drop(spec.fds);
    Ok(WorkerProcess {
        child,
        channel: Channel::new(ours),
    })
}

/// Worker side: takes the IPC socket and `count` passed descriptors. Call once, first thing.
pub fn inherited(count: usize) -> io::Result<(Channel, Vec<OwnedFd>)> {
    let take = |fd: RawFd| -> io::Result<OwnedFd> {
        // SAFETY: fcntl on a descriptor number has no memory-safety preconditions.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("descriptor {fd} was not passed to the worker"),
            ));
        }
        // SAFETY: as above; mark it close-on-exec so it never leaks further.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: the descriptor is open (checked above) and, by the spawn protocol, owned by
        // nothing else in this process; this is the only place that takes it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let channel = Channel::new(UnixStream::from(take(CHANNEL_FD)?));
    let fds = (0..count)
        .map(|i| take(FIRST_PASSED_FD + i as RawFd))
        .collect::<io::Result<Vec<_>>>()?;
    Ok((channel, fds))
}

/// The pid of the confined worker itself, for a worker process `pid` the supervisor started:
/// in a PID namespace, `pid` is the reaper and the worker is its only child; otherwise `pid`
/// itself. Reads /proc (for diagnostics and tests; signals go to `pid`, whose death takes the
/// worker with it).
pub fn confined_pid(pid: u32) -> u32 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pid;
    };
    let parent_line = format!("PPid:\t{pid}");
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|child| {
            std::fs::read_to_string(format!("/proc/{child}/status"))
                .is_ok_and(|s| s.lines().any(|l| l == parent_line))
        })
        .unwrap_or(pid)
}
