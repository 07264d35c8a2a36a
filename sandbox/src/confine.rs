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
    /// RLIMIT_AS: the worker's memory budget (address space), bytes.
    pub address_space: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// Extra system calls to allow (e.g. `ioctl` for a GPU worker).
    pub extra_syscalls: Vec<libc::c_long>,
    /// Paths landlock still lets the worker open (none for a CPU worker; device nodes for a
    /// GPU worker, see [`crate::gpu`]).
    pub grants: Vec<Grant>,
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

/// Applies every layer, in order: rlimits, namespaces, no_new_privs and non-dumpable, landlock,
/// seccomp. Namespaces are best effort ("where the host allows them"); the others are mandatory
/// in [`Mode::Strict`].
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
    let ns = unshare_namespaces();
    report.push("namespaces", ns);
    mandatory(&mut report, "no_new_privs", no_new_privs())?;
    mandatory(&mut report, "landlock", landlock_with(&c.grants))?;
    mandatory(
        &mut report,
        "seccomp",
        crate::seccomp::install(&c.extra_syscalls).map(|()| {
            format!(
                "allowlist of {} system calls, default EPERM; execve/ptrace/process_vm_* kill",
                crate::seccomp::allowed_names().len()
            )
        }),
    )?;
    Ok(report)
}

fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit struct passed by reference.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_rlimits(c: &Confinement) -> Result<String, String> {
    setrlimit(libc::RLIMIT_CORE, 0)?;
    setrlimit(libc::RLIMIT_FSIZE, 0)?;
    setrlimit(libc::RLIMIT_NOFILE, c.open_files)?;
    setrlimit(libc::RLIMIT_AS, c.address_space)?;
    Ok(format!(
        "core 0, file size 0, open files {}, address space {} MiB",
        c.open_files,
        c.address_space >> 20
    ))
}

fn unshare_namespaces() -> Result<String, String> {
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    // SAFETY: unshare takes flags only; the process is single-threaded here (documented
    // precondition of `confine`).
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(format!(
            "unshare(user, net, mount, ipc, uts): {} (the host does not allow unprivileged namespaces)",
            std::io::Error::last_os_error()
        ));
    }
    Ok("user, network, mount, IPC and UTS namespaces".into())
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
