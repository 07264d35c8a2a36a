//! The confinement profile a CUDA worker needs, as data.
//!
//! A CPU worker can do nothing but compute on the descriptors it was handed. A GPU worker must
//! also talk to the NVIDIA driver, which the CUDA runtime does by opening device nodes and
//! issuing ioctls on them, and which reads the driver's and the PCI bus's descriptions. The
//! profile grants exactly that, on top of every CPU layer:
//!
//! - one GPU: the worker is given the device it asked for and no other ([`select`]): its node
//!   alone among `/dev/nvidiaN`, and `CUDA_VISIBLE_DEVICES` set to its UUID, so CUDA sees it
//!   as device 0;
//! - landlock: read-write-ioctl on the control and unified-memory nodes and that GPU's node,
//!   read-only on `/proc/driver/nvidia`, the list of PCI devices and that GPU's own sysfs
//!   directory (the rest of the filesystem stays denied: no other device, no MIG capability);
//! - seccomp: `ioctl` only with the NVIDIA driver's request numbers ([`NVIDIA_IOCTLS`]; the
//!   file-attribute, terminal and socket requests that would otherwise reach the descriptors
//!   the worker holds are refused), `openat` (landlock decides which paths), and the few calls
//!   the driver makes beside them;
//! - the host memory budget as RLIMIT_DATA instead of RLIMIT_AS ([`MemoryLimit::Data`]): the
//!   driver reserves address space for all device memory at initialisation;
//! - no empty root: the device nodes and driver files must stay reachable, so the filesystem
//!   is closed by landlock alone (see [`crate::confine`]).
//!
//! Order in the worker (`runtime/worker/gpu.rs`): load the CUDA libraries (`dlopen`, which
//! starts no thread) *before* confining, so no library directory needs a grant; confine with
//! this profile while single-threaded; only then initialise CUDA, whose threads inherit every
//! layer. What CI can check without a GPU: the profile as data, the grants, and that every
//! escape probe is still refused with the profile active (`securerun doctor --device cuda`).
//!
//! [`MemoryLimit::Data`]: crate::MemoryLimit::Data

use std::path::{Path, PathBuf};

use crate::confine::{Confinement, Grant, GrantAccess, MemoryLimit, Mode};
use crate::seccomp::{masked, ArgRule};

/// `ioctl` requests the NVIDIA driver's nodes take, on the request's low 32 bits (the kernel's
/// `cmd` is an `unsigned int`): `nvidiactl` and `/dev/nvidiaN` use `_IOC` type `'F'`
/// (`NV_IOCTL_MAGIC`); `nvidia-uvm` uses plain numbers below 256 (`UVM_IOCTL_BASE(i)` is `i`)
/// and `UVM_INITIALIZE`/`UVM_DEINITIALIZE` (`0x3000000x`), as NVIDIA's open kernel modules
/// define them. Every other request is refused: `FS_IOC_SETFLAGS` (`'f'`) on the weight files,
/// `FIOASYNC`/`FIOSETOWN` (`'T'`, `0x89`) on the channel.
pub const NVIDIA_IOCTLS: &[ArgRule] = &[(
    "ioctl",
    libc::SYS_ioctl,
    &[
        &[masked(1, 0x0000_ff00, 0x4600)],
        &[masked(1, 0xffff_ff00, 0)],
        &[masked(1, 0xffff_fff0, 0x3000_0000)],
    ],
)];

/// What the profile adds to a CPU worker's confinement.
#[derive(Debug, Clone)]
pub struct GpuProfile {
    pub grants: Vec<Grant>,
    pub extra_syscalls: Vec<libc::c_long>,
    pub extra_arg_rules: &'static [ArgRule],
}

impl GpuProfile {
    /// The confinement of a GPU worker: every CPU layer, this profile's grants and system
    /// calls, and `memory` bytes of host memory as RLIMIT_DATA.
    pub fn confinement(&self, mode: Mode, memory: u64, open_files: u64) -> Confinement {
        Confinement {
            mode,
            memory: MemoryLimit::Data(memory),
            open_files,
            extra_syscalls: self.extra_syscalls.clone(),
            extra_arg_rules: self.extra_arg_rules,
            grants: self.grants.clone(),
            leave_root: true,
        }
    }
}

/// One NVIDIA GPU as the driver lists it in `/proc/driver/nvidia/gpus/BUS/information`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvidiaGpu {
    /// PCI address, `0000:41:00.0`: the order CUDA numbers devices in with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
    pub bus: String,
    /// N of `/dev/nvidiaN`.
    pub minor: u32,
    /// `GPU-…`, what `CUDA_VISIBLE_DEVICES` accepts.
    pub uuid: String,
}

/// The GPU a worker asked for, resolved before confinement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub gpu: NvidiaGpu,
    /// Its sysfs directory, the link `/sys/bus/pci/devices/BUS` resolved.
    pub sysfs: Option<PathBuf>,
}

/// Why the asked-for GPU cannot be given to the worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("cuda:{ordinal}: only {visible} NVIDIA GPU(s) are visible to this process")]
    NoSuchDevice { ordinal: usize, visible: usize },
    #[error("CUDA_VISIBLE_DEVICES names {0:?}, which is no GPU the driver lists (MIG devices are not supported by the confined worker)")]
    UnknownVisible(String),
    #[error("cannot read the driver's GPU list {path}: {reason}")]
    Unreadable { path: String, reason: String },
}

/// The GPUs the driver lists under `root` (`/` on a host), by PCI address. `Ok(None)`: the
/// driver lists none (no driver loaded); the worker then grants no GPU node and CUDA reports
/// the absence itself.
pub fn nvidia_gpus(root: &Path) -> Result<Option<Vec<NvidiaGpu>>, SelectError> {
    let dir = root.join("proc/driver/nvidia/gpus");
    let unreadable = |path: &Path, e: std::io::Error| SelectError::Unreadable {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(&dir, e)),
    };
    let mut gpus = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| unreadable(&dir, e))?;
        let path = entry.path().join("information");
        let text = std::fs::read_to_string(&path).map_err(|e| unreadable(&path, e))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_string())
        };
        let minor = field("Device Minor").and_then(|m| m.parse().ok());
        let (Some(minor), Some(uuid)) = (minor, field("GPU UUID")) else {
            return Err(SelectError::Unreadable {
                path: path.display().to_string(),
                reason: "no Device Minor or GPU UUID line".into(),
            });
        };
        gpus.push(NvidiaGpu {
            bus: entry.file_name().to_string_lossy().to_lowercase(),
            minor,
            uuid,
        });
    }
    gpus.sort_by(|a, b| a.bus.cmp(&b.bus));
    Ok(Some(gpus))
}

/// The GPU CUDA would call device `ordinal` (devices in PCI order, as the worker sets
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`) among those `visible` (`CUDA_VISIBLE_DEVICES`: indices or
/// UUIDs) allows, with its sysfs directory under `root`.
pub fn select(
    root: &Path,
    gpus: &[NvidiaGpu],
    ordinal: usize,
    visible: Option<&str>,
) -> Result<Selected, SelectError> {
    let listed: Vec<&NvidiaGpu> = match visible {
        None => gpus.iter().collect(),
        Some(list) => {
            let mut out = Vec::new();
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let found = match item.parse::<usize>() {
                    Ok(i) => gpus.get(i),
                    Err(_) => gpus.iter().find(|g| g.uuid.eq_ignore_ascii_case(item)),
                };
                match found {
                    Some(g) => out.push(g),
                    // CUDA stops at the first entry it cannot use; so does this.
                    None if item.parse::<usize>().is_ok() => break,
                    None => return Err(SelectError::UnknownVisible(item.to_string())),
                }
            }
            out
        }
    };
    let gpu = listed
        .get(ordinal)
        .copied()
        .cloned()
        .ok_or(SelectError::NoSuchDevice {
            ordinal,
            visible: listed.len(),
        })?;
    let sysfs = std::fs::canonicalize(root.join("sys/bus/pci/devices").join(&gpu.bus)).ok();
    Ok(Selected { gpu, sysfs })
}

/// The NVIDIA CUDA profile for `selected` (none: the driver lists no GPU, and no GPU node is
/// granted), with paths under `/`.
pub fn nvidia(selected: Option<&Selected>) -> GpuProfile {
    let mut nodes: Vec<PathBuf> = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]
        .iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .collect();
    let mut info: Vec<PathBuf> = ["/proc/driver/nvidia", "/sys/bus/pci/devices"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Some(s) = selected {
        nodes.push(PathBuf::from(format!("/dev/nvidia{}", s.gpu.minor)));
        info.extend(s.sysfs.clone());
    }
    with_grants(nodes, info)
}

/// The NVIDIA profile with these device nodes and read-only paths (tests grant a node of their
/// own making).
pub fn with_grants(nodes: Vec<PathBuf>, read_only: Vec<PathBuf>) -> GpuProfile {
    let grants = nodes
        .into_iter()
        .map(|path| Grant {
            path,
            access: GrantAccess::Device,
        })
        .chain(read_only.into_iter().map(|path| Grant {
            path,
            access: GrantAccess::Read,
        }))
        .collect();
    GpuProfile {
        grants,
        // What the driver's initialisation and its helper threads call beside the CPU
        // worker's allowlist. Anything else fails with EPERM (never silently allowed).
        extra_syscalls: vec![
            libc::SYS_openat,
            libc::SYS_pread64,
            libc::SYS_getdents64,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_sched_setaffinity,
            libc::SYS_get_mempolicy,
            libc::SYS_eventfd2,
            libc::SYS_pipe2,
            libc::SYS_uname,
            libc::SYS_sysinfo,
            libc::SYS_getuid,
            libc::SYS_geteuid,
        ],
        extra_arg_rules: NVIDIA_IOCTLS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with two GPUs, listed by the driver out of PCI order, under a fake root.
    fn two_gpus() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (bus, minor, uuid) in [
            ("0000:41:00.0", 1, "GPU-bbbb"),
            ("0000:01:00.0", 0, "GPU-aaaa"),
        ] {
            let dir = root.path().join("proc/driver/nvidia/gpus").join(bus);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("information"),
                format!("Model: \t\t NVIDIA H200\nIRQ: \t\t 42\nGPU UUID: \t {uuid}\nDevice Minor: \t {minor}\nBus Location: \t {bus}\n"),
            )
            .unwrap();
            let sysfs = root.path().join("sys/devices/pci0000:00").join(bus);
            std::fs::create_dir_all(&sysfs).unwrap();
            let link = root.path().join("sys/bus/pci/devices");
            std::fs::create_dir_all(&link).unwrap();
            std::os::unix::fs::symlink(&sysfs, link.join(bus)).unwrap();
        }
        root
    }

    #[test]
    fn the_worker_gets_the_gpu_cuda_would_number_so_and_no_other() {
        let root = two_gpus();
        let gpus = nvidia_gpus(root.path()).unwrap().unwrap();
        assert_eq!(gpus[0].bus, "0000:01:00.0", "PCI order");
        let pick = |ordinal, visible| select(root.path(), &gpus, ordinal, visible);
        assert_eq!(pick(0, None).unwrap().gpu.minor, 0);
        let second = pick(1, None).unwrap();
        assert_eq!(
            (second.gpu.minor, second.gpu.uuid.as_str()),
            (1, "GPU-bbbb")
        );
        assert!(second.sysfs.unwrap().ends_with("pci0000:00/0000:41:00.0"));
        assert_eq!(
            pick(2, None).unwrap_err(),
            SelectError::NoSuchDevice {
                ordinal: 2,
                visible: 2
            }
        );
        // CUDA_VISIBLE_DEVICES: indices into PCI order, or UUIDs; CUDA's ordinal is the
        // position in that list.
        assert_eq!(pick(0, Some("1")).unwrap().gpu.minor, 1);
        assert_eq!(pick(0, Some("GPU-aaaa")).unwrap().gpu.minor, 0);
        assert_eq!(pick(1, Some("1,0")).unwrap().gpu.minor, 0);
        assert!(matches!(
            pick(0, Some("5")).unwrap_err(),
            SelectError::NoSuchDevice { visible: 0, .. }
        ));
        assert!(matches!(
            pick(0, Some("MIG-1234")).unwrap_err(),
            SelectError::UnknownVisible(_)
        ));
        // No driver: no GPU listed, nothing to select.
        assert_eq!(nvidia_gpus(&root.path().join("elsewhere")).unwrap(), None);
    }

    #[test]
    fn the_profile_grants_one_gpu_and_the_driver_s_own_files_only() {
        let root = two_gpus();
        let gpus = nvidia_gpus(root.path()).unwrap().unwrap();
        let selected = select(root.path(), &gpus, 1, None).unwrap();
        let p = nvidia(Some(&selected));
        let mut granted: Vec<String> = p
            .grants
            .iter()
            .map(|g| format!("{} {:?}", g.path.display(), g.access))
            .collect();
        granted.sort();
        let sysfs = selected.sysfs.clone().unwrap();
        let mut expected = vec![
            "/dev/nvidia-uvm Device".to_string(),
            "/dev/nvidia-uvm-tools Device".into(),
            "/dev/nvidia1 Device".into(),
            "/dev/nvidiactl Device".into(),
            "/proc/driver/nvidia Read".into(),
            "/sys/bus/pci/devices Read".into(),
            format!("{} Read", sysfs.display()),
        ];
        expected.sort();
        assert_eq!(granted, expected);
        // Without a GPU listed: the control nodes only (absent nodes are skipped at confine).
        assert!(nvidia(None)
            .grants
            .iter()
            .all(|g| !g.path.to_string_lossy().starts_with("/dev/nvidia0")));
        // Never a way to start a program or reach the network; ioctl only by its rule.
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_ioctl,
        ] {
            assert!(!p.extra_syscalls.contains(&forbidden));
        }
        assert_eq!(p.extra_arg_rules[0].1, libc::SYS_ioctl);
        crate::seccomp::allowlist_filter_with(&p.extra_syscalls, p.extra_arg_rules, 1).unwrap();
    }
}
