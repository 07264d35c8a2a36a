//! The worker's system-call policy, as data (seccompiler builds the BPF).
//!
//! Two filters, installed in this order with TSYNC so every thread is covered:
//! 1. **tripwires** (default allow): `clone3` fails with ENOSYS so glibc falls back to `clone`,
//!    whose flags a filter can inspect; `execve`, `execveat`, `ptrace`, `process_vm_readv`,
//!    `process_vm_writev` kill the process: a worker that tries them is compromised.
//! 2. **allowlist** (default EPERM): what a candle CPU worker behind a socket needs, and
//!    nothing else: no `open*`, no sockets, no `fork` (`clone` only with `CLONE_THREAD`).
//!
//! When several filters match, the kernel applies the strictest action (kill > errno > allow),
//! so the allowlist must allow `clone3` for the tripwire's ENOSYS to be what glibc sees, and the
//! tripwires are installed first because the allowlist forbids `seccomp` itself.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// System calls the worker may make (besides `clone` for threads and `clone3`, see above).
const ALLOWED: &[(&str, libc::c_long)] = &[
    // IPC and already-open descriptors.
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg),
    ("close", libc::SYS_close),
    ("fstat", libc::SYS_fstat),
    ("statx", libc::SYS_statx),
    ("newfstatat", libc::SYS_newfstatat),
    ("lseek", libc::SYS_lseek),
    ("fcntl", libc::SYS_fcntl),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("setsockopt", libc::SYS_setsockopt),
    // Memory.
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mremap", libc::SYS_mremap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    ("brk", libc::SYS_brk),
    // Threads and synchronisation.
    ("futex", libc::SYS_futex),
    ("sched_yield", libc::SYS_sched_yield),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("rseq", libc::SYS_rseq),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("set_tid_address", libc::SYS_set_tid_address),
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("tgkill", libc::SYS_tgkill),
    ("nanosleep", libc::SYS_nanosleep),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("prctl", libc::SYS_prctl),
    // Signals (panics unwind, aborts raise SIGABRT).
    ("sigaltstack", libc::SYS_sigaltstack),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    // Randomness (hash maps, sampling seeds) and exit.
    ("getrandom", libc::SYS_getrandom),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
];

/// Calls that only a compromised worker makes: the process is killed on the spot.
const TRIPWIRES: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
];

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e:?}"))
}

/// Filter 1a: tripwires kill the process.
pub fn tripwire_filter() -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in TRIPWIRES {
        rules.insert(nr, vec![]);
    }
    let kill = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        arch()?,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    // One action per seccompiler filter: the clone3 rule is a program of its own.
    kill.try_into().map_err(|e| format!("seccomp: {e:?}"))
}

/// Filter 1b: `clone3` returns ENOSYS (glibc then uses `clone`).
pub fn clone3_filter() -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, vec![]);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    f.try_into().map_err(|e| format!("seccomp: {e:?}"))
}

/// Filter 2: the allowlist; everything else fails with EPERM.
pub fn allowlist_filter(extra: &[libc::c_long]) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in ALLOWED {
        rules.insert(nr, vec![]);
    }
    for &nr in extra {
        rules.insert(nr, vec![]);
    }
    rules.insert(libc::SYS_clone3, vec![]);
    // clone(flags, ...) only for threads: CLONE_THREAD must be set.
    let thread_only = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(|e| format!("seccomp: {e}"))?])
    .map_err(|e| format!("seccomp: {e}"))?;
    rules.insert(libc::SYS_clone, vec![thread_only]);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    f.try_into().map_err(|e| format!("seccomp: {e:?}"))
}

/// Names of the allowed system calls, for `securerun doctor` and the docs.
pub fn allowed_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = ALLOWED.iter().map(|(n, _)| *n).collect();
    names.extend(["clone (CLONE_THREAD only)", "clone3 (ENOSYS)"]);
    names
}

/// Installs all filters on every thread of the process.
pub fn install(extra: &[libc::c_long]) -> Result<(), String> {
    for program in [
        tripwire_filter()?,
        clone3_filter()?,
        allowlist_filter(extra)?,
    ] {
        seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}
