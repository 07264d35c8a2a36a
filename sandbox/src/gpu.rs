//! The confinement profile a CUDA worker needs, as data.
//!
//! A CPU worker can do nothing but compute on the descriptors it was handed. A GPU worker must
//! also talk to the NVIDIA driver, which the CUDA runtime does by opening device nodes and
//! issuing ioctls on them, and which reads the driver's and the PCI bus's descriptions. The
//! profile grants exactly that, on top of every CPU layer:
//!
//! - landlock: read-write-ioctl on the NVIDIA device nodes, read-only on `/proc/driver/nvidia`,
//!   the PCI devices (`/sys/bus/pci/devices` and the `/sys/devices/pci*` trees its links point
//!   into) and the NUMA nodes (the rest of the filesystem stays denied);
//! - seccomp: `ioctl` (the driver's interface; seccomp cannot tell which file a descriptor is,
//!   so landlock's device grant is what limits it to these nodes), `openat` (landlock decides
//!   which paths), and the few calls the driver makes beside them;
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

use std::path::PathBuf;

use crate::confine::{Confinement, Grant, GrantAccess, MemoryLimit, Mode};

/// Device nodes CUDA compute uses (those absent on a host are skipped): the control node, the
/// unified-memory nodes, one node per GPU, and the MIG capability nodes. The same set NVIDIA's
/// container toolkit exposes for "compute"; `nvidia-modeset` (display) is not granted.
fn device_nodes() -> Vec<PathBuf> {
    let mut nodes: Vec<PathBuf> = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-caps"]
        .iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .collect();
    nodes.extend((0..64).map(|i| PathBuf::from(format!("/dev/nvidia{i}"))));
    nodes
}

/// What the driver reads about the machine, read-only: its own `/proc` entries, the PCI devices
/// and NUMA nodes. `/sys/bus/pci/devices` holds only links; landlock checks the path they
/// resolve to, so the PCI trees they point into (`/sys/devices/pci*`) are granted themselves.
fn driver_information() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = [
        "/proc/driver/nvidia",
        "/sys/bus/pci/devices",
        "/sys/devices/system/node",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    if let Ok(entries) = std::fs::read_dir("/sys/devices") {
        let mut trees: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("pci"))
            .map(|e| e.path())
            .collect();
        trees.sort();
        dirs.extend(trees);
    }
    dirs
}

/// What the profile adds to a CPU worker's confinement.
#[derive(Debug, Clone)]
pub struct GpuProfile {
    pub grants: Vec<Grant>,
    pub extra_syscalls: Vec<libc::c_long>,
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
            grants: self.grants.clone(),
        }
    }
}

/// The NVIDIA CUDA profile.
pub fn nvidia() -> GpuProfile {
    with_device_nodes(device_nodes())
}

/// The NVIDIA profile with these device nodes instead of `/dev/nvidia*` (tests grant a node
/// of their own making).
pub fn with_device_nodes(nodes: Vec<PathBuf>) -> GpuProfile {
    let mut grants: Vec<Grant> = nodes
        .into_iter()
        .map(|path| Grant {
            path,
            access: GrantAccess::Device,
        })
        .collect();
    for dir in driver_information() {
        grants.push(Grant {
            path: dir,
            access: GrantAccess::Read,
        });
    }
    GpuProfile {
        grants,
        // What the driver's initialisation and its helper threads call beside the CPU
        // worker's allowlist. Anything else fails with EPERM (never silently allowed).
        extra_syscalls: vec![
            libc::SYS_ioctl,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_grants_devices_and_driver_info_only() {
        let p = nvidia();
        assert!(p.grants.iter().all(|g| {
            let path = g.path.to_string_lossy();
            [
                "/dev/nvidia",
                "/proc/driver/nvidia",
                "/sys/bus/pci/devices",
                "/sys/devices/pci",
                "/sys/devices/system/node",
            ]
            .iter()
            .any(|prefix| path.starts_with(prefix))
        }));
        assert!(p
            .grants
            .iter()
            .filter(|g| g.path.starts_with("/dev"))
            .all(|g| g.access == GrantAccess::Device));
        // Never a way to start a program or reach the network.
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_fork,
            libc::SYS_ptrace,
        ] {
            assert!(!p.extra_syscalls.contains(&forbidden));
        }
        // The filter with these extras still builds.
        crate::seccomp::allowlist_filter(&p.extra_syscalls, 1).unwrap();
    }
}
