//! Confining the calling process, layer by layer. Call [`confine`] while the process has one
//! thread (landlock on ABI < 8 restricts only the calling thread; `unshare(CLONE_NEWUSER)`
//! refuses a threaded process) and before any untrusted byte is parsed.

use std::path::PathBuf;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// How strictly a layer that cannot be enforced is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every mandatory layer must be enforced, or the worker does not start.
    Strict,
    /// Layers are applied where possible; what is missing is reported, not fatal.
    Permissive,
}

/// What to confine the process to.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub mode: Mode,
    /// The worker's host memory budget, and which limit enforces it.
    pub memory: MemoryLimit,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// Extra system calls to allow (for a GPU worker, see [`crate::gpu`]).
    pub extra_syscalls: Vec<libc::c_long>,
    /// Extra system calls to allow with certain arguments only (a GPU driver's `ioctl`s).
    pub extra_arg_rules: &'static [crate::seccomp::ArgRule],
    /// Paths landlock still lets the worker open (none for a CPU worker; device nodes for a
    /// GPU worker, see [`crate::gpu`]).
    pub grants: Vec<Grant>,
    /// A worker started as root gives up its user and group ids for `nobody`'s before anything
    /// else: for a worker with grants, so that file permissions narrow them too (a root
    /// worker's user namespace maps no id, and on the host it would still own root's files).
    pub leave_root: bool,
}

/// How the worker's host memory budget is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// RLIMIT_AS: every mapping counts, the model's read-only weight mapping included. The
    /// tightest bound, for a CPU worker.
    AddressSpace(u64),
    /// RLIMIT_DATA: private writable memory (heap, anonymous mappings) counts; reservations
    /// without access and read-only file mappings do not. For a GPU worker: the CUDA driver
    /// reserves address space for the device's whole memory (unified addressing, hundreds of
    /// GiB with no access rights), which RLIMIT_AS would refuse at initialisation.
    Data(u64),
}

impl MemoryLimit {
    pub fn bytes(self) -> u64 {
        match self {
            MemoryLimit::AddressSpace(b) | MemoryLimit::Data(b) => b,
        }
    }
}

/// A path the worker may still open under landlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub path: PathBuf,
    pub access: GrantAccess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantAccess {
    /// Read files (and list directories) beneath the path; never execute or write.
    Read,
    /// Read, write and ioctl on a device node (ioctl needs landlock ABI >= 5 to be governed).
    Device,
}

/// One layer and whether it took effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub name: &'static str,
    pub enforced: bool,
    pub detail: String,
}

/// What [`confine`] achieved.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub layers: Vec<Layer>,
}

impl Report {
    pub fn all_enforced(&self) -> bool {
        self.layers.iter().all(|l| l.enforced)
    }

    fn push(&mut self, name: &'static str, result: Result<String, String>) {
        let (enforced, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.layers.push(Layer {
            name,
            enforced,
            detail,
        });
    }
}

/// A mandatory layer could not be enforced in strict mode.
#[derive(Debug, thiserror::Error)]
#[error("sandbox layer {layer} cannot be enforced on this host: {reason} (pass --sandbox=permissive to run with weaker isolation)")]
pub struct ConfineError {
    pub layer: &'static str,
    pub reason: String,
    pub report: Report,
}

/// Layers reported but not required by `securerun doctor`: they depend on what the host allows
/// (namespaces). [`confine`] still fails in strict mode when one of them was possible but did
/// not take effect, or when their absence leaves no signal isolation at all.
pub const OPTIONAL_LAYERS: &[&str] = &["namespaces", "pid namespace", "empty root"];

/// Whether `securerun doctor` treats layer `name` as optional (see [`OPTIONAL_LAYERS`]).
pub fn is_optional(name: &str) -> bool {
    OPTIONAL_LAYERS.contains(&name)
}

/// Applies every layer, in order: rlimits, the parent-death signal, `oom_score_adj`,
/// namespaces (user, PID, network, mount, IPC, UTS: best effort, "where the host allows
/// them"), an empty root directory (in the new mount namespace), the PID namespace (see below),
/// no_new_privs and non-dumpable, dropping every capability, landlock, seccomp. The others are
/// mandatory in [`Mode::Strict`]; so is signal isolation (landlock's signal scoping or a PID
/// namespace, at least one), and the empty root whenever a mount namespace exists.
///
/// **PID namespace.** `CLONE_NEWPID` affects only children, so when it is available this
/// function forks once: the child is PID 1 of the new namespace and returns from here as the
/// confined worker, with every descriptor; the parent becomes a *reaper* that never returns: it
/// closes every descriptor, drops its capabilities, installs a filter that allows little more
/// than `wait4`, waits for the worker and exits the same way (status, or the same signal). The
/// supervisor's child process is the reaper: killing it kills the worker (parent-death signal),
/// and the worker's death ends it. See [`crate::spawn::confined_pid`] for the worker's own pid.
pub fn confine(c: &Confinement) -> Result<Report, ConfineError> {
    let mut report = Report::default();
    let mandatory = |report: &mut Report, name: &'static str, r: Result<String, String>| {
        let failed = r.as_ref().err().cloned();
        report.push(name, r);
        match failed {
            Some(reason) if c.mode == Mode::Strict => Err(ConfineError {
                layer: name,
                reason,
                report: report.clone(),
            }),
            _ => Ok(()),
        }
    };
    mandatory(&mut report, "rlimits", set_rlimits(c))?;
    mandatory(&mut report, "parent death signal", parent_death_signal())?;
    mandatory(&mut report, "oom_score_adj", oom_score_adj())?;
    // Read while /proc is still there (before the empty root and landlock).
    let last_cap = last_cap();
    if c.leave_root {
        // A change of credentials clears the parent-death signal: armed again.
        let left = leave_root().and_then(|d| parent_death_signal().map(|_| d));
        mandatory(&mut report, "unprivileged user", left)?;
    }
    let (ns, unshared) = unshare_namespaces();
    report.push("namespaces", ns);
    let root = if !c.grants.is_empty() {
        Err("not applied: this profile grants host paths (GPU device nodes)".into())
    } else if unshared.mount {
        empty_root()
    } else {
        Err("no mount namespace on this host".into())
    };
    if unshared.mount && c.grants.is_empty() {
        mandatory(&mut report, "empty root", root)?;
    } else {
        report.push("empty root", root);
    }
    let pid_ns = if unshared.pid {
        enter_pid_namespace(last_cap)
    } else {
        Err("no PID namespace on this host".into())
    };
    let in_pid_ns = pid_ns.is_ok();
    report.push("pid namespace", pid_ns);
    mandatory(&mut report, "no_new_privs", no_new_privs())?;
    mandatory(&mut report, "capabilities", drop_capabilities(last_cap))?;
    let landlock = landlock_with(&c.grants);
    let scoped = landlock.is_ok() && landlock_abi() >= 6;
    mandatory(&mut report, "landlock", landlock)?;
    mandatory(
        &mut report,
        "signal isolation",
        signal_isolation(scoped, in_pid_ns),
    )?;
    let seccomp = crate::seccomp::install(&c.extra_syscalls, c.extra_arg_rules).map(|()| {
        let added = c.extra_syscalls.len() + c.extra_arg_rules.len();
        let extra = if added == 0 {
            String::new()
        } else {
            format!(" (+{added} for the device)")
        };
        format!(
            "allowlist of {} system calls{extra}, default EPERM; tgkill only to itself, fcntl \
             only harmless commands; execve/ptrace/process_vm_* kill",
            crate::seccomp::allowed_names().len()
        )
    });
    let filtered = seccomp.is_ok();
    mandatory(&mut report, "seccomp", seccomp)?;
    report.push(
        "thread cap",
        if filtered {
            Ok(
                "clone/clone3 denied in every thread (TSYNC) once the worker has started its \
                compute threads (forbid_new_threads)"
                    .into(),
            )
        } else {
            Err("needs the seccomp layer".into())
        },
    );
    Ok(report)
}

/// Signal isolation needs landlock's signal scoping (ABI >= 6) or a PID namespace (the
/// supervisor's pid does not exist in the worker's namespace); with neither, a compromised
/// worker's only barrier against signalling the supervisor is seccomp alone.
pub fn signal_isolation(landlock_scoped: bool, pid_namespace: bool) -> Result<String, String> {
    match (landlock_scoped, pid_namespace) {
        (true, true) => Ok("landlock signal scoping and a PID namespace".into()),
        (true, false) => Ok("landlock signal scoping".into()),
        (false, true) => Ok("PID namespace".into()),
        (false, false) => Err(
            "neither landlock signal scoping (ABI >= 6) nor a PID namespace is available".into(),
        ),
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit struct passed by reference.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(format!("setrlimit: {}", errno()));
    }
    Ok(())
}

fn set_rlimits(c: &Confinement) -> Result<String, String> {
    setrlimit(libc::RLIMIT_CORE, 0)?;
    setrlimit(libc::RLIMIT_FSIZE, 0)?;
    setrlimit(libc::RLIMIT_MEMLOCK, 0)?;
    setrlimit(libc::RLIMIT_NOFILE, c.open_files)?;
    let (resource, what) = match c.memory {
        MemoryLimit::AddressSpace(_) => (libc::RLIMIT_AS, "address space"),
        MemoryLimit::Data(_) => (libc::RLIMIT_DATA, "data"),
    };
    setrlimit(resource, c.memory.bytes())?;
    Ok(format!(
        "core 0, file size 0, locked memory 0, open files {}, {what} {} MiB",
        c.open_files,
        c.memory.bytes() >> 20
    ))
}

/// The worker dies with SIGKILL when its parent does. [`crate::spawn`] arms it before exec (and
/// checks the supervisor did not die first); here it is checked, and armed again if the exec
/// cleared it (a change of credentials does), against the supervisor's pid that spawn passed.
fn parent_death_signal() -> Result<String, String> {
    let mut sig: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer.
    if unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut sig as *mut libc::c_int) } != 0 {
        return Err(format!("PR_GET_PDEATHSIG: {}", errno()));
    }
    if sig == libc::SIGKILL {
        return Ok("SIGKILL when the supervisor dies".into());
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(format!("PR_SET_PDEATHSIG: {}", errno()));
    }
    let expected = std::env::var(crate::spawn::SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|v| v.parse::<libc::pid_t>().ok());
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    match expected {
        Some(pid) if pid != parent => Err(format!(
            "the supervisor (pid {pid}) is gone; the parent is now {parent}"
        )),
        Some(_) => Ok("SIGKILL when the supervisor dies (armed by the worker)".into()),
        None => Ok("SIGKILL when the parent dies (armed by the worker)".into()),
    }
}

/// The worker is the process the kernel's OOM killer should pick first (raising the score
/// needs no privilege).
/// `nobody`: the user and group a worker that started as root continues as.
const NOBODY: libc::uid_t = 65534;

/// Root's ids become `nobody`'s (real, effective and saved), with no supplementary group; a
/// worker that is not root keeps its own. Before the namespaces: the user namespace is then
/// owned by `nobody`, and nothing on the host is root's to the worker.
fn leave_root() -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok("not root: the supervisor's own unprivileged user".into());
    }
    // SAFETY: setgroups with an empty list; setresgid/setresuid with integer ids. The process
    // is single-threaded (confine's precondition), so every thread changes.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(format!("setgroups: {}", errno()));
        }
        if libc::setresgid(NOBODY, NOBODY, NOBODY) != 0 {
            return Err(format!("setresgid: {}", errno()));
        }
        if libc::setresuid(NOBODY, NOBODY, NOBODY) != 0 {
            return Err(format!("setresuid: {}", errno()));
        }
    }
    Ok(format!(
        "started as root, continues as uid and gid {NOBODY} with no supplementary group"
    ))
}

fn oom_score_adj() -> Result<String, String> {
    std::fs::write("/proc/self/oom_score_adj", b"1000")
        .map_err(|e| format!("/proc/self/oom_score_adj: {e}"))?;
    Ok("1000: first to be killed when memory runs out".into())
}

/// Which namespaces [`unshare_namespaces`] created.
#[derive(Debug, Clone, Copy, Default)]
struct Unshared {
    pid: bool,
    mount: bool,
}

/// New user (where allowed), PID, network, mount, IPC and UTS namespaces; without user
/// namespaces a privileged worker (root) still gets the others. The first combination the
/// host accepts wins.
fn unshare_namespaces() -> (Result<String, String>, Unshared) {
    let base = libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    let attempts = [
        (libc::CLONE_NEWUSER | libc::CLONE_NEWPID, "user, PID, "),
        (libc::CLONE_NEWUSER, "user, "),
        (libc::CLONE_NEWPID, "PID, "),
        (0, ""),
    ];
    let mut refused = Vec::new();
    for (extra, names) in attempts {
        // SAFETY: unshare takes flags only; the process is single-threaded here (documented
        // precondition of `confine`).
        if unsafe { libc::unshare(base | extra) } == 0 {
            let detail = format!("{names}network, mount, IPC and UTS namespaces");
            let detail = if extra & libc::CLONE_NEWUSER == 0 {
                format!("{detail} (no user namespace: {})", refused.join("; "))
            } else {
                detail
            };
            return (
                Ok(detail),
                Unshared {
                    pid: extra & libc::CLONE_NEWPID != 0,
                    mount: true,
                },
            );
        }
        refused.push(format!("{}{}", names, errno()));
    }
    (
        Err(format!(
            "unshare refused ({}): the host does not allow namespaces",
            refused.join("; ")
        )),
        Unshared::default(),
    )
}

fn cstr(s: &str) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(s).map_err(|_| format!("{s:?}: NUL byte"))
}

/// In the new mount namespace, makes an empty read-only tmpfs the root directory
/// (`pivot_root`, the old root detached; `chroot` where pivot_root is refused), so host paths
/// do not even exist for the worker: landlock denies opening files, not `stat`.
fn empty_root() -> Result<String, String> {
    let root = cstr("/")?;
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: mount with NUL-terminated strings (or null where the call ignores them).
    if unsafe {
        libc::mount(
            none,
            root.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(format!("making mounts private: {}", errno()));
    }
    // Any existing directory will do as the mount point: this is our own mount namespace.
    let Some(dir) = ["/tmp", "/mnt", "/dev", "/proc"]
        .into_iter()
        .find(|d| std::fs::metadata(d).is_ok_and(|m| m.is_dir()))
    else {
        return Err("no directory to mount the empty root on".into());
    };
    let target = cstr(dir)?;
    let fstype = cstr("tmpfs")?;
    let options = cstr("size=4k,nr_inodes=8,mode=0555")?;
    // SAFETY: mount with NUL-terminated strings.
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    } != 0
    {
        return Err(format!("mounting an empty tmpfs on {dir}: {}", errno()));
    }
    let dot = cstr(".")?;
    // SAFETY: chdir/pivot_root/umount2/chroot with NUL-terminated paths.
    let how = unsafe {
        if libc::chdir(target.as_ptr()) != 0 {
            return Err(format!("chdir {dir}: {}", errno()));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0 {
            // The old root is now stacked on the new one: detach it, whole tree at once.
            if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
                return Err(format!("detaching the old root: {}", errno()));
            }
            "pivot_root, old root detached"
        } else {
            let pivot = errno();
            if libc::chroot(dot.as_ptr()) != 0 {
                return Err(format!(
                    "pivot_root: {pivot}; chroot: {} (no way to leave the host's root)",
                    errno()
                ));
            }
            "chroot (pivot_root refused)"
        }
    };
    // SAFETY: as above.
    if unsafe { libc::chdir(root.as_ptr()) } != 0 {
        return Err(format!("chdir /: {}", errno()));
    }
    // The host's files must be gone, not merely unreadable.
    if std::fs::symlink_metadata(dir).is_ok() {
        return Err(format!("{dir} is still visible after changing root"));
    }
    Ok(format!(
        "empty read-only tmpfs as / ({how}): host paths do not exist"
    ))
}

fn pipe() -> Result<(libc::c_int, libc::c_int), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", errno()));
    }
    Ok((fds[0], fds[1]))
}

fn close(fds: &[libc::c_int]) {
    for &fd in fds {
        // SAFETY: closing descriptors this module created and owns.
        unsafe { libc::close(fd) };
    }
}

/// The worker's end of the abort relay (see [`relay_abort`]); -1 when there is none.
static ABORT_RELAY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// SIGABRT handler of a worker that is PID 1 of its namespace. The kernel ignores signals a
/// namespace's init sends itself without a handler, so glibc's `abort` ends in a fault
/// (SIGSEGV) instead of SIGABRT; this handler tells the reaper first, which then dies by
/// SIGABRT as the worker meant to. Async-signal-safe: one `write` of one byte.
extern "C" fn relay_abort(_sig: libc::c_int) {
    let fd = ABORT_RELAY.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write of one byte from a static buffer to a descriptor we own.
        unsafe { libc::write(fd, b"A".as_ptr().cast(), 1) };
    }
}

/// How long the worker waits for its reaper to confine itself (it takes microseconds).
const REAPER_READY_MS: libc::c_int = 10_000;

/// Forks into the PID namespace created by `unshare`: returns in the child (PID 1 there) and
/// never returns in the parent, which reaps the child (see [`confine`]).
fn enter_pid_namespace(last_cap: Option<u32>) -> Result<String, String> {
    // The reaper holds `alive_w` while it lives; the worker writes to `abort_w` when it aborts.
    let (alive_r, alive_w) = pipe()?;
    let (abort_r, abort_w) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            close(&[alive_r, alive_w]);
            return Err(e);
        }
    };
    // SAFETY: the process is single-threaded (precondition of `confine`), so the child may do
    // anything after fork.
    match unsafe { libc::fork() } {
        -1 => {
            let e = errno();
            close(&[alive_r, alive_w, abort_r, abort_w]);
            Err(format!("fork into the PID namespace: {e}"))
        }
        0 => {
            close(&[alive_w, abort_r]);
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
                return Err(format!("PR_SET_PDEATHSIG: {}", errno()));
            }
            // Wait for the reaper's one byte: it writes it once it has confined itself, so the
            // worker never runs a line of its own while its reaper is still unconfined. End of
            // file instead means the reaper died (perhaps before the parent-death signal was
            // armed; a PID 1 cannot compare getppid: its parent is outside the namespace).
            let mut pfd = libc::pollfd {
                fd: alive_r,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd on the stack.
            let n = unsafe { libc::poll(&mut pfd, 1, REAPER_READY_MS) };
            let mut byte = 0u8;
            let got = if n == 1 {
                // SAFETY: read of one byte into a local.
                unsafe { libc::read(alive_r, (&mut byte as *mut u8).cast(), 1) }
            } else {
                0
            };
            close(&[alive_r]);
            if got != 1 {
                // SAFETY: _exit has no preconditions; the reaper (and so the supervisor's
                // child) is gone or stuck.
                unsafe { libc::_exit(1) };
            }
            ABORT_RELAY.store(abort_w, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: installs a handler that only makes one async-signal-safe call.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = relay_abort as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(libc::SIGABRT, &action, std::ptr::null_mut()) != 0 {
                    return Err(format!("sigaction(SIGABRT): {}", errno()));
                }
            }
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            if pid != 1 {
                return Err(format!("expected PID 1 in the new namespace, got {pid}"));
            }
            Ok(
                "PID 1 of its own PID namespace (the supervisor and every host process are \
                invisible); a reaper outside waits for it"
                    .into(),
            )
        }
        child => {
            close(&[alive_r, abort_w]);
            reap(child, &[alive_w, abort_r], abort_r, last_cap)
        }
    }
}

/// The reaper: holds nothing but its two pipe ends, `keep` (the worker watches one; `abort`
/// tells it the worker aborted), confines itself as far as it can (best effort: it runs no
/// untrusted code and holds no other descriptor, so a failure here weakens nothing the worker
/// could use), waits for the worker and ends the same way.
fn reap(
    child: libc::pid_t,
    keep: &[libc::c_int; 2],
    abort: libc::c_int,
    last_cap: Option<u32>,
) -> ! {
    // Everything but `keep`: stdio, the IPC socket and the model files belong to the worker,
    // and must close when the worker does.
    let keep_alive = keep[0];
    let mut keep = *keep;
    keep.sort_unstable();
    let mut from: libc::c_uint = 0;
    for fd in keep {
        if (fd as libc::c_uint) > from {
            // SAFETY: close_range on descriptor numbers.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd as libc::c_uint - 1, 0u32) };
        }
        from = fd as libc::c_uint + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0u32) };
    let _ = no_new_privs();
    let _ = drop_capabilities(last_cap);
    let _ = crate::seccomp::install_reaper();
    // SAFETY: write of one byte from a static buffer to our own pipe: the worker may start.
    unsafe { libc::write(keep_alive, b"R".as_ptr().cast(), 1) };
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid writes the status into a local int.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if r < 0 && errno().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(125) };
        }
    }
    if libc::WIFSIGNALED(status) {
        let mut sig = libc::WTERMSIG(status);
        let mut byte = 0u8;
        // SAFETY: read of one byte into a local; the worker (the only writer) is gone, so this
        // returns at once: 1 if it said it was aborting, else 0 (end of file).
        if unsafe { libc::read(abort, (&mut byte as *mut u8).cast(), 1) } == 1 {
            sig = libc::SIGABRT;
        }
        // SAFETY: restoring the default action for `sig`, unblocking it and sending it to
        // ourselves: the reaper dies the way the worker died (no core: RLIMIT_CORE is 0).
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
    }
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// The highest capability number this kernel knows, from /proc (None if unreadable; then
/// [`drop_capabilities`] goes on until the kernel says EINVAL).
fn last_cap() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;

fn capget() -> Result<[CapData; 2], String> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and two data structs, as the kernel expects for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(format!("capget: {}", errno()));
    }
    Ok(data)
}

/// Empties every capability set: the bounding set (`PR_CAPBSET_DROP` for each capability up to
/// `last_cap`, or until EINVAL), the ambient set, then effective, permitted and inheritable
/// (`capset`). Checked with `capget` afterwards. Without `CAP_SETPCAP` (an unprivileged worker
/// on a host without user namespaces) the bounding set cannot be cleared, and does not matter:
/// such a process holds no capability and, with no_new_privs and no exec, cannot gain one.
pub fn drop_capabilities(last_cap: Option<u32>) -> Result<String, String> {
    let before = capget()?;
    let had_setpcap = before[0].effective & (1 << CAP_SETPCAP) != 0;
    let mut bounding_kept = Vec::new();
    for cap in 0..=last_cap.unwrap_or(63) {
        // SAFETY: prctl with integer arguments.
        let inset = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong) };
        if inset < 0 {
            break; // EINVAL: past the last capability
        }
        if inset == 0 {
            continue;
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) } != 0 {
            bounding_kept.push(cap);
        }
    }
    // SAFETY: as above. EINVAL on kernels without ambient capabilities (< 4.3): nothing to clear.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: a v3 header and two (zeroed) data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(format!("capset: {}", errno()));
    }
    let after = capget()?;
    if after
        .iter()
        .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0)
    {
        return Err("capabilities remain after capset".into());
    }
    // SAFETY: prctl with integer arguments.
    let ambient = (0..=last_cap.unwrap_or(63)).any(|cap| unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
            cap as libc::c_ulong,
            0,
            0,
        ) > 0
    });
    if ambient {
        return Err("ambient capabilities remain".into());
    }
    match (bounding_kept.is_empty(), had_setpcap) {
        (true, _) => {
            Ok("none: effective, permitted, inheritable, ambient and bounding sets empty".into())
        }
        (false, false) => Ok(format!(
            "none held (effective, permitted, inheritable, ambient empty); bounding set left as \
             is without CAP_SETPCAP ({} capabilities), harmless with no_new_privs and no exec",
            bounding_kept.len()
        )),
        (false, true) => Err(format!(
            "PR_CAPBSET_DROP refused for capabilities {bounding_kept:?}"
        )),
    }
}

/// Sets no_new_privs and clears the dumpable flag.
pub fn no_new_privs() -> Result<String, String> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!(
                "PR_SET_NO_NEW_PRIVS: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(format!(
                "PR_SET_DUMPABLE: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok("no_new_privs set, not dumpable".into())
}

/// The running kernel's landlock ABI version (0 when unavailable).
pub fn landlock_abi() -> i32 {
    // SAFETY: the documented version query: null attributes, size 0, VERSION flag.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    v.max(0) as i32
}

fn abi_from(version: i32) -> Option<ABI> {
    Some(match version {
        ..=0 => return None,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        7 => ABI::V7,
        8 => ABI::V8,
        _ => ABI::V9,
    })
}

/// Denies all filesystem access (no rule grants any path), TCP bind/connect (ABI >= 4), and
/// scopes abstract Unix sockets and signals (ABI >= 6): everything the kernel's ABI offers,
/// required in full. Applies to the calling thread (and threads it creates later); [`confine`]
/// calls it while the process has one thread. Needs no_new_privs (set here by the crate).
pub fn landlock() -> Result<String, String> {
    landlock_with(&[])
}

/// [`landlock`], except that each grant's path stays reachable with its access. A grant whose
/// path does not exist is skipped (a GPU profile lists every possible device node).
pub fn landlock_with(grants: &[Grant]) -> Result<String, String> {
    let version = landlock_abi();
    let abi = abi_from(version).ok_or("landlock is not available in this kernel")?;
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?;
    let mut what = vec!["filesystem"];
    if version >= 4 {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(err)?;
        what.push("TCP bind/connect");
    }
    if version >= 6 {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(err)?;
        what.push("abstract sockets, signals");
    }
    let mut created = ruleset.create().map_err(err)?;
    let mut granted = Vec::new();
    for g in grants {
        let Ok(fd) = PathFd::new(&g.path) else {
            continue;
        };
        let is_dir = std::fs::metadata(&g.path).is_ok_and(|m| m.is_dir());
        let wanted: BitFlags<AccessFs> = match g.access {
            GrantAccess::Read => AccessFs::ReadFile | AccessFs::ReadDir,
            GrantAccess::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        };
        // Only rights this ABI knows, and for a file only the rights a file can carry.
        let mut access = wanted & AccessFs::from_all(abi);
        if !is_dir {
            access &= AccessFs::from_file(abi);
        }
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
        granted.push(g.path.display().to_string());
    }
    let status = created.restrict_self().map_err(err)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(format!("landlock: ruleset {:?}", status.ruleset));
    }
    let kernel = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => format!("{effective_abi:?}"),
        other => format!("{other:?}"),
    };
    let except = if granted.is_empty() {
        String::new()
    } else {
        format!(" except {}", granted.join(", "))
    };
    Ok(format!(
        "ABI {version} ({kernel}): {} denied{except}",
        what.join(", ")
    ))
}

/// The thread cap could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot forbid new threads: {0}")]
pub struct ThreadCapError(pub String);

/// The second seccomp stage: from now on `clone` and `clone3` fail (EPERM) in every thread of
/// the process (installed with TSYNC), so a compromised worker cannot add threads (or, with
/// the first stage, processes). Call it once the worker has started every thread it will
/// need (its compute pool), after [`confine`]: the allowlist lets a process add filters, never
/// remove one.
pub fn forbid_new_threads() -> Result<(), ThreadCapError> {
    crate::seccomp::install_thread_cap().map_err(ThreadCapError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_needs_signal_scoping_or_a_pid_namespace() {
        assert!(signal_isolation(true, false).is_ok());
        assert!(signal_isolation(false, true).is_ok());
        assert!(signal_isolation(true, true).is_ok());
        assert!(signal_isolation(false, false).is_err());
    }
}
