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

/// The GPU profile allows `ioctl` with the NVIDIA driver's request numbers only: on the
/// descriptors a worker holds (a weight file, the channel), file-attribute, terminal and SIGIO
/// requests are refused by the filter (EPERM), while NVIDIA-shaped ones pass it and get the
/// kernel's own answer (ENOTTY on a regular file). The CPU profile allows no `ioctl` at all.
#[test]
fn the_gpu_profile_allows_only_the_nvidia_driver_ioctls() {
    let file = tempfile::tempfile().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let ioctl_errnos = move |gpu: bool| {
        std::thread::spawn(move || {
            securerun_sandbox::confine::no_new_privs().unwrap();
            let profile = securerun_sandbox::gpu::nvidia(None);
            let program = if gpu {
                securerun_sandbox::seccomp::allowlist_filter_with(
                    &profile.extra_syscalls,
                    profile.extra_arg_rules,
                    1,
                )
            } else {
                securerun_sandbox::seccomp::allowlist_filter(&[], 1)
            }
            .unwrap();
            seccompiler::apply_filter(&program).unwrap();
            let mut word = [0u64; 8];
            let mut request = |cmd: u64| {
                // SAFETY: ioctl on an open descriptor; the kernel writes at most 64 bytes
                // into `word` for the requests tried here.
                errno_of(unsafe { libc::ioctl(fd, cmd as _, word.as_mut_ptr()) })
            };
            [
                request(0xc020_462a), // NV_ESC_RM_CONTROL, _IOWR('F', 0x2a, 32 bytes)
                request(0x0000_0005), // a UVM request number
                request(0x3000_0001), // UVM_INITIALIZE
                request(0x8008_6601), // FS_IOC_GETFLAGS
                request(0x4008_6602), // FS_IOC_SETFLAGS
                request(0x0000_5452), // FIOASYNC
                request(0x0000_8901), // FIOSETOWN
                request(0x0000_541b), // FIONREAD
            ]
        })
        .join()
        .unwrap()
    };
    let gpu = ioctl_errnos(true);
    for (i, e) in gpu[..3].iter().enumerate() {
        assert_eq!(*e, Some(libc::ENOTTY), "NVIDIA-shaped request {i}: {gpu:?}");
    }
    for (i, e) in gpu[3..].iter().enumerate() {
        assert_eq!(*e, Some(libc::EPERM), "other request {i}: {gpu:?}");
    }
    assert!(ioctl_errnos(false).iter().all(|e| *e == Some(libc::EPERM)));
}

/// Shared anonymous memory is the one kind no rlimit but RLIMIT_AS counts (a GPU worker is
/// bounded by RLIMIT_DATA): the allowlist refuses it, and allows private memory and shared
/// mappings of files (the weights).
#[test]
fn the_allowlist_refuses_shared_anonymous_memory() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(4096).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let outcome = std::thread::spawn(move || {
        securerun_sandbox::confine::no_new_privs().unwrap();
        let program = securerun_sandbox::seccomp::allowlist_filter(&[], 1).unwrap();
        seccompiler::apply_filter(&program).unwrap();
        let map = |flags: libc::c_int, fd: libc::c_int| {
            // SAFETY: a fresh mapping of 1 MiB (or the file's page), unmapped at once.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    1 << 20,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Some(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            // SAFETY: p was mapped above with this length.
            unsafe { libc::munmap(p, 1 << 20) };
            None
        };
        (
            map(libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
            map(libc::MAP_SHARED_VALIDATE | libc::MAP_ANONYMOUS, -1),
            map(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            map(libc::MAP_SHARED, fd),
            map(
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN,
                -1,
            ),
        )
    })
    .join()
    .unwrap();
    assert_eq!(outcome.0, Some(libc::EPERM), "shared anonymous");
    assert_eq!(outcome.1, Some(libc::EPERM), "shared-validate anonymous");
    assert_eq!(outcome.2, None, "private anonymous");
    assert_eq!(outcome.3, None, "a shared file mapping");
    assert_eq!(
        outcome.4,
        Some(libc::EPERM),
        "grows-down (counted as stack)"
    );
}

/// prctl only names threads and mappings (and sets no_new_privs again): a worker cannot
/// disarm its parent-death signal (and outlive its supervisor), make itself dumpable, or name
/// a tracer.
#[test]
fn prctl_only_names_things() {
    let outcome = std::thread::spawn(|| {
        securerun_sandbox::confine::no_new_privs().unwrap();
        let program = securerun_sandbox::seccomp::allowlist_filter(&[], 1).unwrap();
        seccompiler::apply_filter(&program).unwrap();
        let name = b"probe\0";
        // SAFETY: prctl with integer arguments, or a NUL-terminated name.
        unsafe {
            (
                errno_of(libc::prctl(libc::PR_SET_NAME, name.as_ptr())),
                errno_of(libc::prctl(libc::PR_SET_PDEATHSIG, 0)),
                errno_of(libc::prctl(libc::PR_SET_DUMPABLE, 1)),
                errno_of(libc::prctl(libc::PR_SET_PTRACER, -1i64)),
            )
        }
    })
    .join()
    .unwrap();
    assert_eq!(outcome.0, None, "PR_SET_NAME");
    assert_eq!(outcome.1, Some(libc::EPERM), "PR_SET_PDEATHSIG");
    assert_eq!(outcome.2, Some(libc::EPERM), "PR_SET_DUMPABLE");
    assert_eq!(outcome.3, Some(libc::EPERM), "PR_SET_PTRACER");
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
