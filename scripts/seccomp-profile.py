#!/usr/bin/env python3
"""Writes packaging/container/seccomp.json: the systemd unit's SystemCallFilter= allowlist,
expanded by systemd-analyze, as an OCI seccomp profile (default EPERM) for Docker, Podman and
Kubernetes (Localhost profile). tests/packaging.rs fails when the two drift apart."""
import json
import re
import subprocess
from pathlib import Path

root = Path(__file__).resolve().parent.parent
unit = (root / "packaging/systemd/securerun.service").read_text()
pending = [e for line in unit.splitlines() if line.startswith("SystemCallFilter=")
           for e in line.split("=", 1)[1].split()]
seen, names = set(), set()
while pending:
    entry = pending.pop()
    if entry in seen:
        continue
    seen.add(entry)
    if not entry.startswith("@"):
        names.add(entry)
        continue
    out = subprocess.run(["systemd-analyze", "syscall-filter", entry],
                         capture_output=True, text=True, check=True).stdout
    pending += [l.strip() for l in out.splitlines()[1:] if l.strip() and not l.strip().startswith("#")]
header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").read_text()
known = set(re.findall(r"#define __NR_(\w+) ", header))
profile = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [{"names": sorted(names & known), "action": "SCMP_ACT_ALLOW"}],
}
(root / "packaging/container/seccomp.json").write_text(json.dumps(profile, indent=1) + "\n")
