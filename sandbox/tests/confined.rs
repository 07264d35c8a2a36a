//! Whole confined processes: this test binary re-executes itself through
//! `securerun_sandbox::spawn` as a worker (`role ...`) that confines itself for real and then
//! attacks, or as a supervisor that dies under its worker. `confine` needs a single-threaded
//! process, which libtest's runner is not, hence `harness = false` and a small runner below:
//! `cargo test -p securerun-sandbox --test confined [NAME_FILTER]`.
//!
//! "Without namespaces" is simulated the way such hosts do it (Docker's default profile, a
//! hardened sysctl): a seccomp filter, installed before `confine`, makes `unshare` fail.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use securerun_sandbox::probe::{EXIT_BLOCKED, PROBES};
use securerun_sandbox::spawn::confined_pid;
use securerun_sandbox::{Channel, Confinement, MemoryLimit, Mode, WorkerProcess, WorkerSpec};

fn exe() -> PathBuf {
    std::env::current_exe().expect("current_exe")
}

// ---------------------------------------------------------------------------------------------
// Worker side (roles).

fn block_namespaces() {
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_unshare, vec![]);
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().expect("arch"),
    )
    .expect("filter");
    let program: seccompiler::BpfProgram = filter.try_into().expect("bpf");
    seccompiler::apply_filter(&program).expect("apply");
}

fn confine_strict(no_ns: bool) {
    if no_ns {
        block_namespaces();
    }
    let c = Confinement {
        mode: Mode::Strict,
        memory: MemoryLimit::AddressSpace(1 << 30),
        open_files: 64,
        extra_syscalls: Vec::new(),
        extra_arg_rules: &[],
        grants: Vec::new(),
        leave_root: false,
    };
    if let Err(e) = securerun_sandbox::confine(&c) {
        eprintln!("{e}");
        std::process::exit(securerun_sandbox::probe::EXIT_SETUP);
    }
}

fn confine_gpu(profile: securerun_sandbox::gpu::GpuProfile) {
    let c = profile.confinement(Mode::Strict, 1 << 30, 64);
    if let Err(e) = securerun_sandbox::confine(&c) {
        eprintln!("{e}");
        std::process::exit(securerun_sandbox::probe::EXIT_SETUP);
    }
}

/// Under a GPU profile that grants `node`: the node opens read-write and its ioctls reach the
/// driver; nothing else opens.
fn granted_node_role(node: &str) -> ! {
    let open = |path: &str, flags: libc::c_int| {
        let c = std::ffi::CString::new(path).expect("path");
        // SAFETY: a NUL-terminated path and integer flags.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(fd)
        }
    };
    let mut wrong = Vec::new();
    match open(node, libc::O_RDWR) {
        Ok(fd) => {
            let mut word = [0u64; 8];
            // An NVIDIA-shaped request (NV_ESC_RM_CONTROL, _IOWR('F', 0x2a, 32 bytes)), which
            // the GPU profile's seccomp rule lets through; the null device answers ENOTTY.
            // SAFETY: the kernel writes at most 32 bytes into `word`.
            let r = unsafe { libc::ioctl(fd, 0xc020_462a_u64 as _, word.as_mut_ptr()) };
            let err = std::io::Error::last_os_error();
            // The null device answers ENOTTY itself; landlock would have said EACCES.
            if r == 0 || err.raw_os_error() != Some(libc::ENOTTY) {
                wrong.push(format!("ioctl on the granted node: {r} {err}"));
            }
        }
        Err(e) => wrong.push(format!("granted node refused: {e}")),
    }
    for (path, flags) in [
        ("/dev/null", libc::O_RDWR),
        ("/etc/passwd", libc::O_RDONLY),
        ("/proc/self/status", libc::O_RDONLY),
    ] {
        if let Ok(fd) = open(path, flags) {
            wrong.push(format!("{path} opened (fd {fd})"));
        }
    }
    if wrong.is_empty() {
        std::process::exit(0)
    }
    eprintln!("{wrong:?}");
    std::process::exit(1)
}

fn take_channel() -> Channel {
    match securerun_sandbox::inherited(0) {
        Ok((channel, _)) => channel,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2)
        }
    }
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn role(args: &[String]) -> ! {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let no_ns = args.last() == Some(&"no-ns");
    match args.as_slice() {
        ["probe", name, parent, ..] => {
            let _channel = take_channel();
            confine_strict(no_ns);
            securerun_sandbox::probe::run(name, parent.parse().expect("pid"))
        }
        ["gpu-probe", name, parent] => {
            let _channel = take_channel();
            confine_gpu(securerun_sandbox::gpu::nvidia(None));
            securerun_sandbox::probe::run(name, parent.parse().expect("pid"))
        }
        ["gpu-node", node] => {
            let _channel = take_channel();
            confine_gpu(securerun_sandbox::gpu::with_grants(
                vec![node.into()],
                Vec::new(),
            ));
            granted_node_role(node)
        }
        ["sleep", ..] => {
            let mut channel = take_channel();
            confine_strict(no_ns);
            channel.send(b"ok").expect("send");
            sleep_forever()
        }
        ["supervise", token] => {
            let mut worker = spawn_role(&["sleep", token], Stdio::inherit());
            worker
                .channel
                .recv(16, Some(Duration::from_secs(30)))
                .expect("worker confined");
            println!("{}", worker.child.id());
            sleep_forever()
        }
        ["report", ..] => {
            let mut channel = take_channel();
            if args.get(1) == Some(&"gpu") {
                confine_gpu(securerun_sandbox::gpu::nvidia(None));
            } else {
                confine_strict(no_ns);
            }
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            channel.send(pid.to_string().as_bytes()).expect("send");
            // Stay alive (for the test to look at /proc) until the test hangs up.
            let _ = channel.recv(16, None);
            std::process::exit(0)
        }
        ["exit", code] => {
            let _channel = take_channel();
            confine_strict(false);
            std::process::exit(code.parse().expect("code"))
        }
        ["tripwire"] => {
            let _channel = take_channel();
            confine_strict(false);
            // SAFETY: ptrace(PTRACE_TRACEME) with integer arguments: a tripwire.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize) };
            std::process::exit(0)
        }
        ["abort"] => {
            let _channel = take_channel();
            confine_strict(false);
            std::process::abort()
        }
        ["threads"] => {
            let _channel = take_channel();
            confine_strict(false);
            threads_role()
        }
        _ => {
            eprintln!("unknown role {args:?}");
            std::process::exit(2)
        }
    }
}

fn threads_role() -> ! {
    use std::sync::mpsc;
    // A pool thread started before the cap, like rayon's.
    let (go, wait) = mpsc::channel::<()>();
    let (report, outcome) = mpsc::channel::<bool>();
    let pool = std::thread::spawn(move || {
        let _ = wait.recv();
        let _ = report.send(std::thread::Builder::new().spawn(|| ()).is_err());
    });
    let before = std::thread::Builder::new()
        .spawn(|| ())
        .map(|h| h.join().is_ok())
        .unwrap_or(false);
    if let Err(e) = securerun_sandbox::forbid_new_threads() {
        eprintln!("{e}");
        std::process::exit(10);
    }
    let main_refused = std::thread::Builder::new().spawn(|| ()).is_err();
    let _ = go.send(());
    let pool_refused = outcome.recv().unwrap_or(false);
    let _ = pool.join();
    // seccomp itself: only adding filters, without a listener, is allowed.
    let program = securerun_sandbox::seccomp::thread_cap_filter().expect("filter");
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    let mut action: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    // SAFETY: seccomp with a valid program pointer or a pointer to a local u32.
    let (listener, avail, added) = unsafe {
        (
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &fprog,
            ),
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_ACTION_AVAIL,
                0,
                &mut action,
            ),
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog),
        )
    };
    let results = [
        ("a thread starts before the cap", before),
        ("the main thread cannot start one after", main_refused),
        ("a pool thread cannot start one after", pool_refused),
        ("no seccomp listener", listener < 0),
        ("no other seccomp operation", avail < 0),
        ("another restricting filter can be added", added == 0),
    ];
    let failed: Vec<_> = results.iter().filter(|(_, ok)| !ok).collect();
    if failed.is_empty() {
        std::process::exit(0)
    }
    eprintln!("{failed:?}");
    std::process::exit(1)
}

// ---------------------------------------------------------------------------------------------
// Test side.

fn spawn_role(args: &[&str], stderr: Stdio) -> WorkerProcess {
    securerun_sandbox::spawn(WorkerSpec {
        program: exe(),
        args: std::iter::once("role")
            .chain(args.iter().copied())
            .map(Into::into)
            .collect(),
        env: Vec::new(),
        fds: Vec::new(),
        stderr,
    })
    .expect("spawn")
}

/// Runs a role to its end: exit status and stderr.
fn run_role(args: &[&str]) -> (ExitStatus, String) {
    let mut p = spawn_role(args, Stdio::piped());
    let mut err = String::new();
    if let Some(mut stderr) = p.child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    (p.child.wait().expect("wait"), err)
}

fn probe(name: &str, no_ns: bool) -> (ExitStatus, String) {
    let parent = std::process::id().to_string();
    let mut args = vec!["probe", name, &parent];
    if no_ns {
        args.push("no-ns");
    }
    run_role(&args)
}

fn assert_blocked(name: &str, no_ns: bool) -> String {
    let (status, err) = probe(name, no_ns);
    assert!(
        status.code() == Some(EXIT_BLOCKED) || status.signal() == Some(libc::SIGSYS),
        "probe {name} (no_ns {no_ns}): {status:?} {err}"
    );
    err
}

/// A live, confined worker: (its process as spawned, the confined process's pid on the host,
/// the pid it sees itself).
fn live_worker(no_ns: bool) -> (WorkerProcess, u32, String) {
    let mut args = vec!["report"];
    if no_ns {
        args.push("no-ns");
    }
    let mut p = spawn_role(&args, Stdio::inherit());
    let own = p
        .channel
        .recv(64, Some(Duration::from_secs(30)))
        .expect("report");
    let pid = confined_pid(p.child.id());
    (p, pid, String::from_utf8_lossy(&own).into_owned())
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn pids_with_token(token: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == token.as_bytes()))
        })
        .collect()
}

fn a_dead_supervisor_leaves_no_worker_behind() {
    let token = format!("securerun-pdeathsig-{}", std::process::id());
    let mut supervisor = Command::new(exe())
        .args(["role", "supervise", &token])
        .stdout(Stdio::piped())
        .spawn()
        .expect("supervisor");
    let mut line = String::new();
    std::io::BufReader::new(supervisor.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("worker pid");
    let worker: u32 = line.trim().parse().expect("pid");
    let real = confined_pid(worker);
    let before = pids_with_token(&token);
    assert!(before.contains(&worker), "{before:?} {worker}");
    // The worker sleeps: it never notices its socket closing. Only the kernel can stop it.
    supervisor.kill().expect("kill");
    supervisor.wait().expect("wait");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = pids_with_token(&token);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = pids_with_token(&token);
    }
    for &pid in &left {
        // SAFETY: cleaning up our own test processes.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "worker processes {left:?} (worker {worker}, confined {real}) survived their supervisor"
    );
}

fn the_worker_is_pid_1_of_its_own_pid_namespace() {
    let (mut p, real, own) = live_worker(false);
    assert_eq!(own, "1", "getpid() inside the worker");
    assert_ne!(real, p.child.id(), "the spawned process is the reaper");
    let nspid = status_field(real, "NSpid:");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [real.to_string().as_str(), "1"],
        "{nspid}"
    );
    // The reaper is confined too: no_new_privs, a seccomp filter, no descriptors but one.
    let reaper = p.child.id();
    assert_eq!(status_field(reaper, "NoNewPrivs:"), "1");
    assert_eq!(status_field(reaper, "Seccomp:"), "2");
    let fds = std::fs::read_dir(format!("/proc/{reaper}/fd"))
        .expect("fds")
        .count();
    assert_eq!(fds, 2, "the reaper holds only its two pipes");
    drop(p.channel);
    let status = p.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

fn the_reaper_passes_exit_status_and_signal_through() {
    let (status, err) = run_role(&["exit", "7"]);
    assert_eq!(status.code(), Some(7), "{err}");
    let (status, err) = run_role(&["tripwire"]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?} {err}");
    // An abort is still told as SIGABRT, though a PID 1 cannot die by a signal it sends
    // itself (glibc's abort ends in a fault): the worker relays it to the reaper.
    let (status, err) = run_role(&["abort"]);
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?} {err}");
    // Killing the spawned process (what the supervisor does) takes the worker with it.
    let (mut p, real, _) = live_worker(false);
    assert_ne!(real, p.child.id());
    p.child.kill().expect("kill");
    assert_eq!(p.child.wait().expect("wait").signal(), Some(libc::SIGKILL));
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{real}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{real}")).exists(),
        "worker {real} outlived its reaper"
    );
}

fn the_worker_is_the_oom_killers_first_choice() {
    for no_ns in [false, true] {
        let (p, real, _) = live_worker(no_ns);
        let adj = std::fs::read_to_string(format!("/proc/{real}/oom_score_adj")).expect("read");
        assert_eq!(adj.trim(), "1000", "no_ns {no_ns}");
        drop(p);
    }
}

fn no_capabilities_with_or_without_namespaces() {
    for no_ns in [false, true] {
        let (p, real, own) = live_worker(no_ns);
        if no_ns {
            // Without namespaces this root-started worker is in the host's user namespace.
            assert_ne!(own, "1");
            assert_eq!(
                status_field(real, "Uid:").split_whitespace().next(),
                Some("0")
            );
        }
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(
                status_field(real, set),
                "0000000000000000",
                "{set} (no_ns {no_ns})"
            );
        }
        drop(p);
        let err = assert_blocked("capability", no_ns);
        assert!(err.contains("PR_CAPBSET_DROP"), "{err}");
    }
}

fn a_host_path_cannot_even_be_stat_ed() {
    let err = assert_blocked("stat-host-path", false);
    assert!(err.contains("No such file"), "{err}");
}

fn the_thread_cap_stops_every_thread_from_starting_threads() {
    let (status, err) = run_role(&["threads"]);
    assert_eq!(status.code(), Some(0), "{status:?} {err}");
    assert_blocked("thread-flood", false);
}

fn signals_and_sigio_cannot_reach_the_supervisor() {
    for no_ns in [false, true] {
        assert_blocked("signal-supervisor", no_ns);
        assert_blocked("sigio-owner", no_ns);
    }
}

fn every_probe_is_blocked_with_and_without_namespaces() {
    for no_ns in [false, true] {
        for (name, _) in PROBES {
            // The empty root needs a mount namespace: without one, landlock still denies
            // opening host files, but `stat` works (reported as "empty root" not enforced).
            if no_ns && *name == "stat-host-path" {
                continue;
            }
            assert_blocked(name, no_ns);
        }
    }
}

/// `doctor --device cuda`'s promise, on a host without a GPU (the nodes the profile lists do
/// not exist and are skipped): with the GPU profile active every escape is still refused,
/// except that host paths can be `stat`ed (no empty root: the device nodes live in the host's
/// tree), which landlock does not govern.
fn every_probe_is_blocked_under_the_gpu_profile() {
    let parent = std::process::id().to_string();
    for (name, _) in PROBES {
        let (status, err) = run_role(&["gpu-probe", name, &parent]);
        let blocked = status.code() == Some(EXIT_BLOCKED) || status.signal() == Some(libc::SIGSYS);
        if *name == "stat-host-path" {
            assert_eq!(
                status.code(),
                Some(0),
                "stat is not governed by landlock: {err}"
            );
        } else {
            assert!(
                blocked,
                "probe {name} under the GPU profile: {status:?} {err}"
            );
        }
    }
}

/// A GPU worker started as root (as CI runs) continues as `nobody` with no supplementary group
/// before its namespaces exist, so file permissions narrow its grants too; every capability
/// is still gone.
fn a_gpu_worker_started_as_root_runs_as_nobody() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the worker leaves root only when it starts as root (CI runs as root)");
        return;
    }
    let mut p = spawn_role(&["report", "gpu"], Stdio::inherit());
    p.channel
        .recv(64, Some(Duration::from_secs(30)))
        .expect("report");
    let real = confined_pid(p.child.id());
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<String> = status_field(real, field)
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(ids, ["65534"; 4], "{field}");
    }
    assert_eq!(status_field(real, "Groups:"), "");
    assert_eq!(status_field(real, "CapEff:"), "0000000000000000");
}

/// The profile's device grant, for real: a character device node of the test's own making
/// (the null device's numbers, under a directory of its own) opens read-write and takes ioctls
/// under the GPU profile; the real /dev/null, host files and /proc stay closed. Needs
/// CAP_MKNOD (CI runs as root).
fn a_granted_device_node_opens_and_nothing_else_does() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making a device node needs root (CI runs as root)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("securerun-gpu-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let node = dir.join("nvidia0");
    let c = std::ffi::CString::new(node.to_str().expect("utf-8")).expect("path");
    // SAFETY: a NUL-terminated path; mode and device number are integers.
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    // World read-write, as the NVIDIA driver makes its nodes: the worker is `nobody` by then.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (status, err) = run_role(&["gpu-node", node.to_str().expect("utf-8")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(0), "{err}");
}

type Case = (&'static str, fn());

const CASES: &[Case] = &[
    (
        "every_probe_is_blocked_under_the_gpu_profile",
        every_probe_is_blocked_under_the_gpu_profile,
    ),
    (
        "a_granted_device_node_opens_and_nothing_else_does",
        a_granted_device_node_opens_and_nothing_else_does,
    ),
    (
        "a_gpu_worker_started_as_root_runs_as_nobody",
        a_gpu_worker_started_as_root_runs_as_nobody,
    ),
    (
        "a_dead_supervisor_leaves_no_worker_behind",
        a_dead_supervisor_leaves_no_worker_behind,
    ),
    (
        "the_worker_is_pid_1_of_its_own_pid_namespace",
        the_worker_is_pid_1_of_its_own_pid_namespace,
    ),
    (
        "the_reaper_passes_exit_status_and_signal_through",
        the_reaper_passes_exit_status_and_signal_through,
    ),
    (
        "the_worker_is_the_oom_killers_first_choice",
        the_worker_is_the_oom_killers_first_choice,
    ),
    (
        "no_capabilities_with_or_without_namespaces",
        no_capabilities_with_or_without_namespaces,
    ),
    (
        "a_host_path_cannot_even_be_stat_ed",
        a_host_path_cannot_even_be_stat_ed,
    ),
    (
        "the_thread_cap_stops_every_thread_from_starting_threads",
        the_thread_cap_stops_every_thread_from_starting_threads,
    ),
    (
        "signals_and_sigio_cannot_reach_the_supervisor",
        signals_and_sigio_cannot_reach_the_supervisor,
    ),
    (
        "every_probe_is_blocked_with_and_without_namespaces",
        every_probe_is_blocked_with_and_without_namespaces,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("role") {
        role(&args[1..]);
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in CASES {
            println!("{name}: test");
        }
        return;
    }
    let mut failed = Vec::new();
    let mut ran = 0;
    for &(name, case) in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let ok = std::panic::catch_unwind(case).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failed.push(name);
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}
