//! The worker's system-call policy, as data (seccompiler builds the BPF).
//!
//! Filters installed at confinement, in this order, with TSYNC so every thread is covered:
//! 1. **tripwires** (default allow): `clone3` fails with ENOSYS so glibc falls back to `clone`,
//!    whose flags a filter can inspect; `execve`, `execveat`, `ptrace`, `process_vm_readv`,
//!    `process_vm_writev` kill the process: a worker that tries them is compromised.
//! 2. **allowlist** (default EPERM): what a candle CPU worker behind a socket needs, and
//!    nothing else: no `open*`, no sockets, no `fork` (`clone` only with `CLONE_THREAD`). Some
//!    calls are allowed only with certain arguments ([`ARG_RULES`]): `tgkill` only at the
//!    worker's own process (the rule is built at confinement time from `getpid()`), `fcntl`
//!    only with commands that cannot hand the descriptor's events or locks to anyone, and
//!    `seccomp` only to add filters (which can only restrict further).
//!
//! Then, once the worker has started its compute threads, the **thread cap**
//! ([`thread_cap_filter`], installed by [`crate::forbid_new_threads`]): `clone` and `clone3`
//! fail, for every thread.
//!
//! A worker in a PID namespace has a reaper outside it (see [`crate::confine`]), which gets its
//! own, tiny filter ([`reaper_filter`]).
//!
//! When several filters match, the kernel applies the strictest action (kill > errno > allow),
//! so the allowlist must allow `clone3` for the tripwire's ENOSYS to be what glibc sees, and the
//! tripwires are installed first because the allowlist forbids `seccomp` with any other
//! operation or flag.

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
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("setsockopt", libc::SYS_setsockopt),
    // Memory.
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
    ("nanosleep", libc::SYS_nanosleep),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("clock_gettime", libc::SYS_clock_gettime),
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

/// The value an argument rule compares with.
#[derive(Debug, Clone, Copy)]
pub enum ArgValue {
    /// A constant.
    Const(u32),
    /// The worker's own process id (`getpid()` when the filter is built).
    OwnPid,
}

/// `(arg & mask) == value` for one argument, on its low 32 bits (every argument tested here is
/// an `int` or `unsigned int` in the kernel, which ignores the high bits).
#[derive(Debug, Clone, Copy)]
pub struct Cond {
    pub arg: u8,
    pub mask: u32,
    pub value: ArgValue,
}

const fn eq(arg: u8, value: u32) -> Cond {
    Cond {
        arg,
        mask: u32::MAX,
        value: ArgValue::Const(value),
    }
}

/// `(arg & mask) == value`.
pub const fn masked(arg: u8, mask: u32, value: u32) -> Cond {
    Cond {
        arg,
        mask,
        value: ArgValue::Const(value),
    }
}

const fn bits_clear(arg: u8, mask: u32) -> Cond {
    Cond {
        arg,
        mask,
        value: ArgValue::Const(0),
    }
}

const OWN_PID: Cond = Cond {
    arg: 0,
    mask: u32::MAX,
    value: ArgValue::OwnPid,
};

/// `PR_SET_VMA` (<linux/prctl.h>; glibc names its malloc arenas with it), which the libc crate
/// does not export.
const PR_SET_VMA: u32 = 0x5356_4d41;

/// A system call allowed only with certain arguments: name, number, and alternatives (the call
/// is allowed if every condition of one alternative holds).
pub type ArgRule = (&'static str, libc::c_long, &'static [&'static [Cond]]);

/// System calls allowed only with certain arguments.
pub const ARG_RULES: &[ArgRule] = &[
    // mmap: anything but shared anonymous memory (MAP_SHARED or MAP_SHARED_VALIDATE with
    // MAP_ANONYMOUS), which RLIMIT_DATA does not count: a GPU worker's host memory is bounded
    // by RLIMIT_DATA. Files (the weights) may be mapped shared; private memory is counted.
    // Nor MAP_GROWSDOWN, whose mapping the kernel counts as stack, not data.
    (
        "mmap",
        libc::SYS_mmap,
        &[
            &[bits_clear(
                3,
                (libc::MAP_SHARED | libc::MAP_GROWSDOWN) as u32,
            )],
            &[bits_clear(
                3,
                (libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN) as u32,
            )],
        ],
    ),
    // prctl: thread and mapping names (std, glibc) and no_new_privs again (seccompiler sets it
    // before adding the thread cap). Not PR_SET_PDEATHSIG (a worker that disarms it outlives
    // its supervisor), PR_SET_DUMPABLE, PR_SET_PTRACER, PR_SET_MM, ...
    (
        "prctl",
        libc::SYS_prctl,
        &[
            &[eq(0, libc::PR_SET_NAME as u32)],
            &[eq(0, libc::PR_GET_NAME as u32)],
            &[eq(0, PR_SET_VMA)],
            &[eq(0, libc::PR_SET_NO_NEW_PRIVS as u32)],
        ],
    ),
    // Signals only to the worker's own threads (glibc's raise/abort: tgkill(getpid(), tid, sig)).
    // `kill`, `tkill`, `rt_sigqueueinfo`, `pidfd_send_signal` are not allowed at all.
    ("tgkill", libc::SYS_tgkill, &[&[OWN_PID]]),
    // fcntl: descriptor flags, status flags without O_ASYNC (no SIGIO), and duplication.
    // Not F_SETOWN(_EX), F_SETSIG, F_SETLEASE, F_NOTIFY, F_SETLK*, F_OFD_*, F_SETPIPE_SZ, ...
    (
        "fcntl",
        libc::SYS_fcntl,
        &[
            &[eq(1, libc::F_GETFD as u32)],
            &[eq(1, libc::F_SETFD as u32)],
            &[eq(1, libc::F_GETFL as u32)],
            &[
                eq(1, libc::F_SETFL as u32),
                bits_clear(2, libc::O_ASYNC as u32),
            ],
            &[eq(1, libc::F_DUPFD_CLOEXEC as u32)],
        ],
    ),
    // seccomp: only SECCOMP_SET_MODE_FILTER, with no flag but TSYNC (no listener, no
    // SPEC_ALLOW, no logging): a new filter can only restrict the worker further.
    (
        "seccomp",
        libc::SYS_seccomp,
        &[&[
            eq(0, libc::SECCOMP_SET_MODE_FILTER),
            bits_clear(1, !(libc::SECCOMP_FILTER_FLAG_TSYNC as u32)),
        ]],
    ),
];

/// The thread cap: after it, no thread of the worker can create a thread or process.
pub const THREAD_CAP: &[(&str, libc::c_long)] =
    &[("clone", libc::SYS_clone), ("clone3", libc::SYS_clone3)];

/// What the PID-namespace reaper may do: tell the worker it is confined (one byte on a pipe,
/// the only descriptor it can write), wait for the worker, read whether it aborted, die like it
/// did, exit.
pub const REAPER_ALLOWED: &[(&str, libc::c_long)] = &[
    ("write", libc::SYS_write),
    ("wait4", libc::SYS_wait4),
    ("read", libc::SYS_read),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("getpid", libc::SYS_getpid),
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

fn condition(c: &Cond, own_pid: libc::pid_t) -> Result<SeccompCondition, String> {
    let value = match c.value {
        ArgValue::Const(v) => v,
        ArgValue::OwnPid => own_pid as u32,
    };
    let op = if c.mask == u32::MAX {
        SeccompCmpOp::Eq
    } else {
        SeccompCmpOp::MaskedEq(u64::from(c.mask))
    };
    SeccompCondition::new(c.arg, SeccompCmpArgLen::Dword, op, u64::from(value))
        .map_err(|e| format!("seccomp: {e}"))
}

fn arg_rules(alternatives: &[&[Cond]], own_pid: libc::pid_t) -> Result<Vec<SeccompRule>, String> {
    alternatives
        .iter()
        .map(|conds| {
            let conds = conds
                .iter()
                .map(|c| condition(c, own_pid))
                .collect::<Result<Vec<_>, _>>()?;
            SeccompRule::new(conds).map_err(|e| format!("seccomp: {e}"))
        })
        .collect()
}

/// Filter 2: the allowlist; everything else fails with EPERM. `own_pid` is the process id the
/// worker will have while the filter is in force (`getpid()`; 1 in its own PID namespace):
/// `tgkill` is allowed only at it.
pub fn allowlist_filter(
    extra: &[libc::c_long],
    own_pid: libc::pid_t,
) -> Result<BpfProgram, String> {
    allowlist_filter_with(extra, &[], own_pid)
}

/// [`allowlist_filter`] plus system calls allowed with certain arguments only (a device's
/// `ioctl` requests, see [`crate::gpu`]).
pub fn allowlist_filter_with(
    extra: &[libc::c_long],
    extra_rules: &[ArgRule],
    own_pid: libc::pid_t,
) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in ALLOWED {
        rules.insert(nr, vec![]);
    }
    for &(_, nr, alternatives) in ARG_RULES.iter().chain(extra_rules) {
        rules.insert(nr, arg_rules(alternatives, own_pid)?);
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

/// The thread cap: `clone` and `clone3` fail with EPERM; everything else is left to the
/// filters already installed.
pub fn thread_cap_filter() -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in THREAD_CAP {
        rules.insert(nr, vec![]);
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    f.try_into().map_err(|e| format!("seccomp: {e:?}"))
}

/// The reaper's filter: [`REAPER_ALLOWED`], and `kill` only at itself (to die by the signal
/// that killed the worker); everything else fails with EPERM.
pub fn reaper_filter(own_pid: libc::pid_t) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in REAPER_ALLOWED {
        rules.insert(nr, vec![]);
    }
    rules.insert(libc::SYS_kill, arg_rules(&[&[OWN_PID]], own_pid)?);
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
    names.extend(ARG_RULES.iter().map(|(n, _, _)| *n));
    names.extend(["clone (CLONE_THREAD only)", "clone3 (ENOSYS)"]);
    names
}

fn own_pid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Installs the confinement filters on every thread of the process.
pub fn install(extra: &[libc::c_long], extra_rules: &[ArgRule]) -> Result<(), String> {
    for program in [
        tripwire_filter()?,
        clone3_filter()?,
        allowlist_filter_with(extra, extra_rules, own_pid())?,
    ] {
        seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}

/// Installs the thread cap on every thread of the process (allowed under the allowlist: it
/// only adds a filter).
pub fn install_thread_cap() -> Result<(), String> {
    seccompiler::apply_filter_all_threads(&thread_cap_filter()?)
        .map_err(|e| format!("seccomp: {e}"))
}

/// Installs the reaper's filter (the reaper has a single thread).
pub fn install_reaper() -> Result<(), String> {
    seccompiler::apply_filter(&reaper_filter(own_pid())?).map_err(|e| format!("seccomp: {e}"))
}
