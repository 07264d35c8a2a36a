//! The shipped service definitions, checked with the tools operators use: the systemd units
//! pass `systemd-analyze verify` and score at most 2.0 in `systemd-analyze security`, and the
//! strict sandbox still works under the unit's own system-call allowlist (reproduced here as a
//! real seccomp filter with no_new_privs, since CI has no systemd as PID 1 to `systemd-run`).

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for the packaging tests")
}

/// A unit as installed, with `ExecStart=` pointing at the binary under test (`verify` checks
/// that the command exists).
fn installed(unit: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo("packaging/systemd").join(unit)).unwrap();
    let path = dir.join(unit);
    std::fs::write(
        &path,
        text.replace("/usr/bin/securerun", env!("CARGO_BIN_EXE_securerun")),
    )
    .unwrap();
    path
}

fn exposure(unit: &Path) -> f64 {
    let o = systemd_analyze(&["security", "--offline=true", unit.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{out}{}", String::from_utf8_lossy(&o.stderr)));
    line.split(": ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_units_verify_and_score_at_most_2() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["securerun.service", "securerun@.service"] {
        let path = installed(unit, dir.path());
        let target = if unit.contains('@') {
            // A template is verified as an instance.
            let instance = dir.path().join("securerun@demo.service");
            std::fs::copy(&path, &instance).unwrap();
            instance
        } else {
            path
        };
        let o = systemd_analyze(&["verify", "--man=no", target.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.trim().is_empty(), "{unit}: {err}");
        let score = exposure(&target);
        assert!(score <= 2.0, "{unit}: exposure {score}");
    }
}

/// The GPU drop-in (`packaging/systemd/cuda.conf`) applied to the unit: it still verifies, the
/// service gains the NVIDIA nodes and nothing else (every other hardening line stays), and the
/// exposure stays at most 2.5 (a device policy with device nodes and all of /proc is what the
/// driver needs).
#[test]
fn the_gpu_drop_in_verifies_and_keeps_the_hardening() {
    let dir = tempfile::tempdir().unwrap();
    let unit = installed("securerun.service", dir.path());
    let drop_ins = dir.path().join("securerun.service.d");
    std::fs::create_dir(&drop_ins).unwrap();
    let text = std::fs::read_to_string(repo("packaging/systemd/cuda.conf")).unwrap();
    std::fs::write(
        drop_ins.join("cuda.conf"),
        text.replace("/usr/bin/securerun", env!("CARGO_BIN_EXE_securerun")),
    )
    .unwrap();
    let o = systemd_analyze(&["verify", "--man=no", unit.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "{err}");
    // The drop-in was read: the exposure moved from the plain unit's.
    let with_gpu = exposure(&unit);
    std::fs::remove_dir_all(&drop_ins).unwrap();
    let without = exposure(&unit);
    assert!(
        with_gpu > without,
        "drop-in not applied: {with_gpu} vs {without}"
    );
    assert!(with_gpu <= 2.5, "exposure with the GPU drop-in: {with_gpu}");
    let allowed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("DeviceAllow="))
        .collect();
    assert!(
        allowed
            .iter()
            .all(|d| d.starts_with("/dev/nvidia") && d.ends_with(" rw")),
        "{allowed:?}"
    );
    assert!(text.contains("--device cuda"));
    for kept in [
        "PrivateUsers",
        "NoNewPrivileges",
        "SystemCallFilter",
        "ProtectSystem",
    ] {
        assert!(!text.contains(kept), "the drop-in must not loosen {kept}");
    }
}

/// The unit's `SystemCallFilter=` lines, expanded by systemd itself into syscall names.
fn unit_syscalls(unit: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(unit).unwrap();
    let mut pending: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .flat_map(|l| l.split_whitespace().map(str::to_string))
        .collect();
    assert!(!pending.is_empty(), "no SystemCallFilter= in {unit:?}");
    assert!(
        pending.iter().all(|e| !e.starts_with('~')),
        "an allowlist only"
    );
    let mut names = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(entry) = pending.pop() {
        if !seen.insert(entry.clone()) {
            continue;
        }
        if !entry.starts_with('@') {
            names.push(entry);
            continue;
        }
        let o = systemd_analyze(&["syscall-filter", &entry]);
        assert!(o.status.success(), "{entry}");
        for line in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                pending.push(item.to_string());
            }
        }
    }
    names
}

/// Syscall numbers of this architecture, from the kernel headers.
fn syscall_numbers() -> BTreeMap<String, i64> {
    let header = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
        .expect("kernel headers (linux-libc-dev)");
    header
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("#define __NR_")?;
            let (name, nr) = rest.split_once(' ')?;
            Some((name.to_string(), nr.trim().parse().ok()?))
        })
        .collect()
}

/// Runs `securerun doctor` (strict: every layer must be enforced, escapes must fail) under
/// `unit`'s system-call allowlist, as systemd would install it: everything else fails with
/// EPERM (`SystemCallErrorNumber=EPERM`), no_new_privs set.
fn doctor_under(unit: &Path) -> std::process::Output {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let numbers = syscall_numbers();
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = unit_syscalls(unit)
        .iter()
        .filter_map(|n| numbers.get(n))
        .map(|&nr| (nr, vec![]))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_securerun"));
    cmd.arg("doctor");
    // SAFETY: between fork and exec only prctl and the seccomp syscall, on memory prepared
    // before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const _) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// The complaint this answers: systemd's usual `@system-service` allowlist blocks landlock and
/// seccomp, so the strict sandbox refused to start under a hardened unit. Under the shipped
/// unit's filter it starts, and every escape still fails; under `@system-service` alone it
/// refuses (the test of the test).
#[test]
fn the_strict_sandbox_works_under_the_unit_s_syscall_filter() {
    let dir = tempfile::tempdir().unwrap();
    let unit = installed("securerun.service", dir.path());
    let o = doctor_under(&unit);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("NOT enforced"), "{out}");

    let plain = dir.path().join("plain.service");
    std::fs::write(
        &plain,
        "[Service]\nExecStart=/bin/true\nSystemCallFilter=@system-service\n",
    )
    .unwrap();
    let o = doctor_under(&plain);
    assert!(
        !o.status.success(),
        "strict doctor passed under @system-service alone: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// The packaging linters live in the compatibility clients' environment (scripts/test.sh).
fn tool(name: &str) -> PathBuf {
    let bin = std::env::var_os("SECURERUN_COMPAT_PYTHON")
        .map(PathBuf::from)
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| repo(".cache/compat-env/bin"));
    let path = bin.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/test.sh",
        path.display()
    );
    path
}

/// The Kubernetes manifests validate against the API's own schemas (strict: an unknown field
/// is an error), and a mistyped field is caught (the test of the test). The Containerfile
/// passes hadolint at warning level. Neither is built or applied here (no container registry
/// or cluster on CI machines); see docs/runbook.md.
#[test]
fn the_kubernetes_manifests_and_the_containerfile_validate() {
    let manifests = repo("packaging/kubernetes/securerun.yaml");
    let validate = |path: &Path| {
        Command::new(tool("kubernetes-validate"))
            .args(["--strict", "-k", "1.33.0", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = validate(&manifests);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    for kind in [
        "statefulset/securerun",
        "service/securerun",
        "configmap/securerun-config",
    ] {
        assert!(
            out.contains(&format!("passed for resource {kind}")),
            "{out}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.yaml");
    let text = std::fs::read_to_string(&manifests).unwrap();
    std::fs::write(
        &typo,
        text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )
    .unwrap();
    assert!(!validate(&typo).status.success(), "a mistyped field passed");

    let o = Command::new(tool("hadolint"))
        .args(["--failure-threshold", "warning"])
        .arg(repo("packaging/container/Containerfile"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// The container's seccomp profile (Docker, Podman, Kubernetes `Localhost`) is the systemd
/// unit's allowlist: the two cannot drift (regenerate with scripts/seccomp-profile.py).
#[test]
fn the_container_seccomp_profile_is_the_unit_s_allowlist() {
    let profile: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("packaging/container/seccomp.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let listed: std::collections::BTreeSet<String> = profile["syscalls"][0]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let numbers = syscall_numbers();
    let expected: std::collections::BTreeSet<String> =
        unit_syscalls(&repo("packaging/systemd/securerun.service"))
            .into_iter()
            .filter(|n| numbers.contains_key(n))
            .collect();
    assert_eq!(
        listed, expected,
        "packaging/container/seccomp.json is stale: run scripts/seccomp-profile.py"
    );
    for needed in ["landlock_restrict_self", "seccomp", "unshare", "pivot_root"] {
        assert!(listed.contains(needed), "{needed}");
    }
}
