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
