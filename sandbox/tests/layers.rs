//! Each layer on its own, so that none of them silently depends on another: landlock without
//! seccomp, seccomp without landlock. Both restrict only the calling thread when installed
//! without TSYNC, so each test confines a fresh thread and leaves the test process free.

use std::ffi::CString;

fn errno_of(ret: libc::c_int) -> Option<i32> {
    (ret < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn open(path: &str, flags: libc::c_int) -> Option<i32> {
    let c = CString::new(path).unwrap();
    // SAFETY: NUL-terminated path; a returned descriptor is closed.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd >= 0 {
        // SAFETY: fd was just opened.
        unsafe { libc::close(fd) };
    }
    errno_of(fd)
}

fn tcp_socket() -> Option<i32> {
    // SAFETY: plain socket call; closed if it succeeds.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        unsafe { libc::close(fd) };
    }
    errno_of(fd)
}

#[test]
fn landlock_alone_denies_files() {
    let tmp = std::env::temp_dir().join(format!("securerun-ll-{}", std::process::id()));
    let tmp_path = tmp.to_str().unwrap().to_string();
    let outcome = std::thread::spawn(move || {
        securerun_sandbox::confine::no_new_privs().unwrap();
        securerun_sandbox::confine::landlock().unwrap();
        (
            open("/etc/passwd", libc::O_RDONLY),
            open(&tmp_path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL),
            tcp_socket(),
        )
    })
    .join()
    .unwrap();
    assert_eq!(outcome.0, Some(libc::EACCES), "read /etc/passwd");
    assert_eq!(outcome.1, Some(libc::EACCES), "create a file");
    // Sockets themselves are seccomp's job; landlock only restricts bind/connect.
    assert_eq!(outcome.2, None);
    assert!(!tmp.exists());
    // The rest of the process is untouched.
    assert_eq!(open("/etc/passwd", libc::O_RDONLY), None);
}

#[test]
fn seccomp_alone_denies_files_sockets_and_fork() {
    let outcome = std::thread::spawn(|| {
        securerun_sandbox::confine::no_new_privs().unwrap();
        let program = securerun_sandbox::seccomp::allowlist_filter(&[], 1).unwrap();
        seccompiler::apply_filter(&program).unwrap();
        // SAFETY: fork's child exits at once (if the call were allowed).
        let fork = unsafe { libc::fork() };
        if fork == 0 {
            unsafe { libc::_exit(0) };
        }
        (
            open("/etc/passwd", libc::O_RDONLY),
            tcp_socket(),
            errno_of(fork),
        )
    })
    .join()
    .unwrap();
    assert_eq!(outcome.0, Some(libc::EPERM), "open");
    assert_eq!(outcome.1, Some(libc::EPERM), "socket");
    assert_eq!(outcome.2, Some(libc::EPERM), "fork");
}

#[test]
fn a_landlock_grant_opens_one_device_node_and_nothing_else() {
    // /dev/null stands in for a GPU device node: granted read-write, everything else denied.
    let outcome = std::thread::spawn(|| {
        securerun_sandbox::confine::no_new_privs().unwrap();
        let detail = securerun_sandbox::confine::landlock_with(&[
            securerun_sandbox::Grant {
                path: "/dev/null".into(),
                access: securerun_sandbox::GrantAccess::Device,
            },
            securerun_sandbox::Grant {
                path: "/nonexistent/device".into(),
                access: securerun_sandbox::GrantAccess::Device,
            },
        ])
        .unwrap();
        (
            detail,
            open("/dev/null", libc::O_RDWR),
            open("/dev/zero", libc::O_RDONLY),
            open("/etc/passwd", libc::O_RDONLY),
        )
    })
    .join()
    .unwrap();
    assert!(outcome.0.contains("except /dev/null"), "{}", outcome.0);
    assert_eq!(outcome.1, None, "the granted node opens");
    assert_eq!(outcome.2, Some(libc::EACCES), "another device node");
    assert_eq!(outcome.3, Some(libc::EACCES), "a file");
}

#[test]
fn the_gpu_profile_allows_ioctl_which_the_cpu_profile_denies() {
    let ioctl_errno = |extra: Vec<libc::c_long>| {
        std::thread::spawn(move || {
            securerun_sandbox::confine::no_new_privs().unwrap();
            let program = securerun_sandbox::seccomp::allowlist_filter(&extra, 1).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD on stdin's descriptor writes one int into `n`.
            errno_of(unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) })
        })
        .join()
        .unwrap()
    };
    assert_eq!(ioctl_errno(Vec::new()), Some(libc::EPERM));
    assert_ne!(
        ioctl_errno(securerun_sandbox::gpu::nvidia().extra_syscalls),
        Some(libc::EPERM)
    );
}

fn own_pid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

fn fcntl_errno(fd: libc::c_int, cmd: libc::c_int, arg: libc::c_long) -> Option<i32> {
    // SAFETY: fcntl on an open descriptor with an integer argument.
    errno_of(unsafe { libc::fcntl(fd, cmd, arg) })
}

#[test]
fn seccomp_alone_lets_signals_reach_only_the_workers_own_threads() {
    // Signal 0: the kernel's permission checks without delivering anything.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let pid = own_pid();
    let outcome = std::thread::spawn(move || {
        securerun_sandbox::confine::no_new_privs().unwrap();
        let program = securerun_sandbox::seccomp::allowlist_filter(&[], pid).unwrap();
        seccompiler::apply_filter(&program).unwrap();
        // SAFETY: signal system calls with integer arguments, signal 0.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
            (
                libc::syscall(libc::SYS_tgkill, pid, tid, 0) as libc::c_int,
                libc::syscall(libc::SYS_tgkill, parent, parent, 0) as libc::c_int,
                libc::syscall(libc::SYS_tkill, tid, 0) as libc::c_int,
                libc::kill(parent, 0),
                libc::kill(pid, 0),
            )
        }
    })
    .join()
    .unwrap();
    assert_eq!(
        outcome.0, 0,
        "tgkill at its own thread (glibc's raise/abort)"
    );
    assert_eq!(outcome.1, -1, "tgkill at the parent process");
    assert_eq!(outcome.2, -1, "tkill");
    assert_eq!(outcome.3, -1, "kill at the parent process");
    assert_eq!(outcome.4, -1, "kill, even at itself");
}

#[test]
fn seccomp_alone_allows_only_harmless_fcntl_commands() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let pid = own_pid();
    let outcome = std::thread::spawn(move || {
        securerun_sandbox::confine::no_new_privs().unwrap();
        let program = securerun_sandbox::seccomp::allowlist_filter(&[], pid).unwrap();
        // A descriptor of our own, opened before the filter.
        let path = std::ffi::CString::new("/dev/null").unwrap();
        // SAFETY: NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(fd >= 0);
        seccompiler::apply_filter(&program).unwrap();
        let flags = libc::c_long::from(libc::O_NONBLOCK);
        let allowed = [
            ("F_GETFD", fcntl_errno(fd, libc::F_GETFD, 0)),
            (
                "F_SETFD",
                fcntl_errno(fd, libc::F_SETFD, libc::FD_CLOEXEC.into()),
            ),
            ("F_GETFL", fcntl_errno(fd, libc::F_GETFL, 0)),
            ("F_SETFL O_NONBLOCK", fcntl_errno(fd, libc::F_SETFL, flags)),
            (
                "F_DUPFD_CLOEXEC",
                fcntl_errno(fd, libc::F_DUPFD_CLOEXEC, 10),
            ),
        ];
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_RDLCK as i16;
        let denied = [
            ("F_SETOWN", fcntl_errno(fd, libc::F_SETOWN, parent.into())),
            ("F_SETSIG", fcntl_errno(fd, 10, libc::SIGUSR1.into())),
            (
                "F_SETFL O_ASYNC",
                fcntl_errno(fd, libc::F_SETFL, libc::O_ASYNC.into()),
            ),
            (
                "F_SETLEASE",
                fcntl_errno(fd, libc::F_SETLEASE, libc::F_RDLCK.into()),
            ),
            ("F_NOTIFY", fcntl_errno(fd, libc::F_NOTIFY, 1)),
            ("F_DUPFD", fcntl_errno(fd, libc::F_DUPFD, 10)),
            // SAFETY: F_SETLK/F_OFD_SETLK with a pointer to a local flock.
            (
                "F_SETLK",
                errno_of(unsafe { libc::fcntl(fd, libc::F_SETLK, &lock) }),
            ),
            (
                "F_OFD_SETLK",
                errno_of(unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &lock) }),
            ),
            ("F_SETPIPE_SZ", fcntl_errno(fd, libc::F_SETPIPE_SZ, 1 << 20)),
        ];
        (allowed, denied)
    })
    .join()
    .unwrap();
    for (cmd, errno) in outcome.0 {
        assert_eq!(errno, None, "{cmd} must stay allowed");
    }
    for (cmd, errno) in outcome.1 {
        assert_eq!(errno, Some(libc::EPERM), "{cmd} must be refused");
    }
}
