//! Escape attempts run inside a confined process, each of which must fail. Like Firecracker's
//! demo binaries, they are real system calls, not checks of configuration: `securerun doctor`
//! and the test suite run every probe in its own freshly confined process and require it to
//! be refused (an error return) or to get the process killed.

use std::ffi::CString;

/// Exit code of a probe whose action was refused with an error.
pub const EXIT_BLOCKED: i32 = 3;
/// Exit code of a probe whose action succeeded: the sandbox failed.
pub const EXIT_ESCAPED: i32 = 0;
/// Exit code of a probe that could not be set up at all.
pub const EXIT_SETUP: i32 = 4;

/// Every probe: name and what it tries.
pub const PROBES: &[(&str, &str)] = &[
    ("read-file", "open /etc/passwd for reading"),
    ("create-file", "create a file in /tmp"),
    ("network", "socket + connect to 127.0.0.1:22"),
    ("exec", "execve /bin/sh"),
    ("fork", "fork a child process"),
    ("ptrace", "ptrace-attach to the parent"),
    ("read-memory", "read the parent's memory (process_vm_readv)"),
    ("proc-mem", "open /proc/<parent>/mem"),
    (
        "signal-supervisor",
        "kill/tgkill/tkill the supervisor (signal 0)",
    ),
    (
        "sigio-owner",
        "route SIGIO to the supervisor (F_SETOWN, ioctl)",
    ),
    ("thread-flood", "start threads after the thread cap"),
    ("capability", "use CAP_SETPCAP, CAP_IPC_LOCK, CAP_NET_ADMIN"),
    ("stat-host-path", "stat /etc/passwd"),
    (
        "other-device",
        "open /dev/null for writing (no device granted)",
    ),
    (
        "uncounted-memory",
        "map 64 MiB RLIMIT_DATA does not count (shared, grows-down)",
    ),
    (
        "parent-death",
        "disarm the parent-death signal (PR_SET_PDEATHSIG 0)",
    ),
];

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Runs probe `name` in this (already confined) process and exits: [`EXIT_BLOCKED`] with the
/// error on stderr if the kernel refused, [`EXIT_ESCAPED`] if the action worked. Some probes
/// get the process killed by seccomp instead, which also counts as blocked.
pub fn run(name: &str, parent: libc::pid_t) -> ! {
    let outcome: Result<(), std::io::Error> = match name {
        "read-file" => open_path("/etc/passwd", libc::O_RDONLY),
        "create-file" => open_path(
            &format!("/tmp/securerun-probe-{}", std::process::id()),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        ),
        "network" => network(),
        "exec" => exec(),
        "fork" => fork(),
        // SAFETY: ptrace with integer arguments; the target pid is the supervisor's.
        "ptrace" => check(unsafe { libc::ptrace(libc::PTRACE_ATTACH, parent, 0usize, 0usize) }),
        "read-memory" => read_memory(parent),
        "proc-mem" => open_path(&format!("/proc/{parent}/mem"), libc::O_RDONLY),
        "signal-supervisor" => signal_supervisor(parent),
        "sigio-owner" => sigio_owner(parent),
        "thread-flood" => thread_flood(),
        "capability" => capability(),
        "stat-host-path" => stat_path("/etc/passwd"),
        "other-device" => open_path("/dev/null", libc::O_RDWR),
        "uncounted-memory" => uncounted_memory(),
        // SAFETY: prctl with integer arguments.
        "parent-death" => check_int(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) }),
        _ => {
            eprintln!("unknown probe {name:?}");
            std::process::exit(EXIT_SETUP)
        }
    };
    match outcome {
        Ok(()) => std::process::exit(EXIT_ESCAPED),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BLOCKED)
        }
    }
}

fn check(ret: libc::c_long) -> Result<(), std::io::Error> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn open_path(path: &str, flags: libc::c_int) -> Result<(), std::io::Error> {
    let c = CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path; the descriptor, if any, is closed right away.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd was just returned by open.
    unsafe { libc::close(fd) };
    Ok(())
}

fn network() -> Result<(), std::io::Error> {
    // SAFETY: plain socket/connect calls on a stack sockaddr_in of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 22u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let e = errno();
        libc::close(fd);
        // A refused connection still means the socket reached the network stack.
        if r < 0 && e.raw_os_error() != Some(libc::ECONNREFUSED) {
            return Err(e);
        }
    }
    Ok(())
}

fn exec() -> Result<(), std::io::Error> {
    let sh = CString::new("/bin/sh").expect("no NUL");
    let argv = [sh.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated argv/envp arrays of valid C strings.
    unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(errno())
}

fn fork() -> Result<(), std::io::Error> {
    // SAFETY: the child exits immediately without touching any state.
    match unsafe { libc::fork() } {
        -1 => Err(errno()),
        0 => unsafe { libc::_exit(0) },
        _ => Ok(()),
    }
}

fn read_memory(parent: libc::pid_t) -> Result<(), std::io::Error> {
    let mut buf = [0u8; 16];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Any address: the call is what is being tested.
    let remote = libc::iovec {
        iov_base: 0x400000 as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local iovec over a stack buffer of the stated length.
    check(unsafe { libc::process_vm_readv(parent, &local, 1, &remote, 1, 0) } as libc::c_long)
}

/// Runs every attempt; the probe escapes if any one of them succeeds. The error lists each
/// refusal.
fn any_of(attempts: Vec<(&str, Result<(), std::io::Error>)>) -> Result<(), std::io::Error> {
    let mut refusals = Vec::new();
    for (what, r) in attempts {
        match r {
            Ok(()) => {
                eprintln!("{what} succeeded");
                return Ok(());
            }
            Err(e) => refusals.push(format!("{what}: {e}")),
        }
    }
    Err(std::io::Error::other(refusals.join("; ")))
}

fn check_int(ret: libc::c_int) -> Result<(), std::io::Error> {
    check(libc::c_long::from(ret))
}

/// Signal 0: the kernel's permission check without delivering anything (a probe that got
/// through must not actually hurt the supervisor).
fn signal_supervisor(parent: libc::pid_t) -> Result<(), std::io::Error> {
    // SAFETY: signal-sending system calls with integer arguments; signal 0 delivers nothing.
    any_of(vec![
        ("kill", check_int(unsafe { libc::kill(parent, 0) })),
        (
            "tgkill",
            check(unsafe { libc::syscall(libc::SYS_tgkill, parent, parent, 0) }),
        ),
        (
            "tkill",
            check(unsafe { libc::syscall(libc::SYS_tkill, parent, 0) }),
        ),
    ])
}

/// Asks for SIGIO on stdin (/dev/null in a spawned process) to go to the supervisor, or for
/// a signal of its choice: a worker that could do this could signal whom it likes.
fn sigio_owner(parent: libc::pid_t) -> Result<(), std::io::Error> {
    let fd = 0;
    // SAFETY: F_GETFD on a descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        eprintln!("stdin is not open: {}", errno());
        std::process::exit(EXIT_SETUP);
    }
    // <linux/fcntl.h> and <asm/sockios.h> values the libc crate does not export.
    const F_SETSIG: libc::c_int = 10;
    const FIOSETOWN: libc::c_ulong = 0x8901;
    const F_SETOWN_EX: libc::c_int = 15;
    const F_OWNER_PID: libc::c_int = 1;
    #[repr(C)]
    struct FOwnerEx {
        kind: libc::c_int,
        pid: libc::pid_t,
    }
    let owner = FOwnerEx {
        kind: F_OWNER_PID,
        pid: parent,
    };
    // SAFETY: fcntl on an open descriptor with integer arguments, or a pointer to a local
    // f_owner_ex for F_SETOWN_EX.
    any_of(vec![
        (
            "F_SETOWN",
            check_int(unsafe { libc::fcntl(fd, libc::F_SETOWN, parent) }),
        ),
        (
            "F_SETOWN_EX",
            check_int(unsafe { libc::fcntl(fd, F_SETOWN_EX, &owner) }),
        ),
        (
            "F_SETSIG",
            check_int(unsafe { libc::fcntl(fd, F_SETSIG, libc::SIGUSR1) }),
        ),
        (
            "F_SETFL O_ASYNC",
            check_int(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_ASYNC) }),
        ),
        // The same through ioctl, which a GPU worker may call (for its driver's requests).
        // SAFETY: FIOASYNC and FIOSETOWN read one int through the pointer.
        (
            "ioctl FIOASYNC",
            check_int(unsafe { libc::ioctl(fd, libc::FIOASYNC, &1 as *const libc::c_int) }),
        ),
        (
            "ioctl FIOSETOWN",
            check_int(unsafe { libc::ioctl(fd, FIOSETOWN, &parent as *const libc::pid_t) }),
        ),
    ])
}

/// Maps anonymous memory no rlimit but RLIMIT_AS counts (a GPU worker's host memory is bounded
/// by RLIMIT_DATA): shared, or grows-down (counted as stack), and touches it.
fn uncounted_memory() -> Result<(), std::io::Error> {
    const LEN: usize = 64 << 20;
    let private = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let attempts = [
        ("MAP_SHARED", libc::MAP_SHARED | libc::MAP_ANONYMOUS),
        ("MAP_GROWSDOWN", private | libc::MAP_GROWSDOWN),
    ]
    .map(|(what, flags)| {
        // SAFETY: a fresh mapping, written only within its length, then unmapped.
        let mapped = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                Err(errno())
            } else {
                std::ptr::write_bytes(p as *mut u8, 1, LEN);
                libc::munmap(p, LEN);
                Ok(())
            }
        };
        (what, mapped)
    });
    any_of(attempts.into_iter().collect())
}

/// Installs the thread cap, as the worker does once its compute threads run, then tries to
/// start threads.
fn thread_flood() -> Result<(), std::io::Error> {
    if let Err(e) = crate::forbid_new_threads() {
        eprintln!("{e}");
        std::process::exit(EXIT_SETUP);
    }
    let mut refusals = Vec::new();
    for _ in 0..16 {
        match std::thread::Builder::new().spawn(|| ()) {
            Ok(_) => return Ok(()),
            Err(e) => refusals.push(e),
        }
    }
    Err(std::io::Error::other(format!(
        "16 thread starts refused: {}",
        refusals.first().map_or(String::new(), |e| e.to_string())
    )))
}

/// Actions that need a capability and that the system-call filter lets through, so that only
/// the (empty) capability sets stop them: dropping from the bounding set (CAP_SETPCAP, in the
/// worker's own user namespace), locking memory with RLIMIT_MEMLOCK 0 (CAP_IPC_LOCK), forcing
/// a socket buffer size (CAP_NET_ADMIN) on the IPC socket.
fn capability() -> Result<(), std::io::Error> {
    let len = 4096;
    // SAFETY: an anonymous private mapping of one page, unmapped if it was made.
    let locked = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            Err(errno())
        } else {
            libc::munmap(p, len);
            Ok(())
        }
    };
    let size: libc::c_int = 1 << 20;
    // SAFETY: prctl with integer arguments; setsockopt with a pointer to a local int of the
    // stated size on the IPC socket (fd 3).
    any_of(vec![
        (
            "PR_CAPBSET_DROP",
            // Capability 0 is CAP_CHOWN.
            check_int(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, 0 as libc::c_ulong) }),
        ),
        ("mmap MAP_LOCKED", locked),
        (
            "SO_RCVBUFFORCE",
            check_int(unsafe {
                libc::setsockopt(
                    crate::spawn::CHANNEL_FD,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }),
        ),
    ])
}

fn stat_path(path: &str) -> Result<(), std::io::Error> {
    let c = CString::new(path).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path and a stat buffer on the stack.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check_int(unsafe { libc::stat(c.as_ptr(), &mut st) })
}
