//! The confinement profile a CUDA worker needs, as data.
//!
//! A CPU worker can do nothing but compute on the descriptors it was handed. A GPU worker must
//! also talk to the NVIDIA driver, which the CUDA runtime does by opening device nodes and
//! issuing ioctls on them, and which reads the driver's and the PCI bus's descriptions. The
//! profile grants exactly that, on top of every CPU layer:
//!
//! - landlock: read-write-ioctl on the NVIDIA device nodes, read-only on `/proc/driver/nvidia`
//!   and `/sys/bus/pci/devices` (the rest of the filesystem stays denied);
//! - seccomp: `ioctl` (the driver's interface; seccomp cannot tell which file a descriptor is,
//!   so landlock's device grant is what limits it to these nodes), `openat` (landlock decides
//!   which paths), and the few calls the driver makes beside them.
//!
//! Order in the worker: load `libcuda` (a `dlopen`, which starts no thread) *before* confining,
//! so no library directory needs a grant; confine with this profile while single-threaded;
//! only then initialise CUDA, whose threads inherit every layer. The worker side of this
//! (behind the `cuda` feature) cannot be built or run on CI, which has neither `nvcc` nor a GPU.

use std::path::PathBuf;

use crate::confine::{Grant, GrantAccess};

/// Device nodes the NVIDIA driver exposes (those absent on a host are skipped).
fn device_nodes() -> Vec<PathBuf> {
    let mut nodes: Vec<PathBuf> = [
        "nvidiactl",
        "nvidia-uvm",
        "nvidia-uvm-tools",
        "nvidia-modeset",
    ]
    .iter()
    .map(|n| PathBuf::from("/dev").join(n))
    .collect();
    nodes.extend((0..64).map(|i| PathBuf::from(format!("/dev/nvidia{i}"))));
    nodes
}

/// What the profile adds to a CPU worker's confinement.
#[derive(Debug, Clone)]
pub struct GpuProfile {
    pub grants: Vec<Grant>,
    pub extra_syscalls: Vec<libc::c_long>,
}

/// The NVIDIA CUDA profile.
pub fn nvidia() -> GpuProfile {
    let mut grants: Vec<Grant> = device_nodes()
        .into_iter()
        .map(|path| Grant {
            path,
            access: GrantAccess::Device,
        })
        .collect();
    for dir in ["/proc/driver/nvidia", "/sys/bus/pci/devices"] {
        grants.push(Grant {
            path: dir.into(),
            access: GrantAccess::Read,
        });
    }
    GpuProfile {
        grants,
        extra_syscalls: vec![
            libc::SYS_ioctl,
            libc::SYS_openat,
            libc::SYS_pread64,
            libc::SYS_getdents64,
            libc::SYS_readlinkat,
            libc::SYS_sched_setaffinity,
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
            ["/dev/nvidia", "/proc/driver/nvidia", "/sys/bus/pci/devices"]
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
