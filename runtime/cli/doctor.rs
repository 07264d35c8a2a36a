//! `securerun doctor`: which sandbox layers this host enforces, and escape attempts from inside a
//! confined worker, each of which must be blocked. Exits non-zero if a layer is missing or any
//! probe gets through. With `--device cuda`, everything runs under the GPU profile, and a
//! confined worker must also initialise the device and compute on it.

use clap::Args;

use super::CmdResult;
use crate::DeviceChoice;

#[derive(Args)]
pub struct DoctorArgs {
    /// Check the confinement of a worker for this device: cpu, cuda or cuda:N (the GPU profile:
    /// the NVIDIA device nodes granted, the driver's system calls allowed).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
}

/// Under the GPU profile the host's directory tree stays in place (the device nodes and the
/// driver's files live in it), so a path's existence can be learnt with `stat`, which landlock
/// does not govern; opening any path but the granted ones is still refused.
const VISIBLE_UNDER_GPU_PROFILE: &str = "stat-host-path";

pub fn run(args: DoctorArgs) -> CmdResult {
    let program = std::env::current_exe()?;
    let device = args.device;
    let name = device.to_string();
    let gpu = device != DeviceChoice::Cpu;
    if gpu {
        println!("sandbox layers on this host, GPU profile ({device}):");
    } else {
        println!("sandbox layers on this host:");
    }
    let layers = crate::worker::host_layers(&program, device)?;
    let mut ok = true;
    for layer in &layers {
        // Namespace-based layers are best effort: reported, not required (confine itself
        // refuses strict mode when they were possible but failed, or when no signal isolation
        // is left).
        let required = !securerun_sandbox::confine::is_optional(&layer.name);
        let mark = match (layer.enforced, required) {
            (true, _) => "enforced",
            (false, true) => "MISSING",
            (false, false) => "unavailable (optional)",
        };
        ok &= layer.enforced || !required;
        println!("  {:<19} {:<22} {}", layer.name, mark, layer.detail);
    }
    println!("escape attempts from a confined worker:");
    for probe in crate::worker::run_probes(&program, device) {
        let mark = if probe.blocked {
            "blocked"
        } else if gpu && probe.name == VISIBLE_UNDER_GPU_PROFILE {
            "visible"
        } else {
            ok = false;
            "ESCAPED"
        };
        let how = if mark == "visible" {
            "names only: the GPU profile keeps the host's tree (no empty root); opening is refused"
                .to_string()
        } else {
            probe.how
        };
        println!(
            "  {:<17} {:<8} {:<45} {how}",
            probe.name, mark, probe.attempt
        );
    }
    if gpu {
        println!("the device from a confined worker (GPU profile, threads capped):");
        // The worker's word is checked against what the driver lists here, outside it.
        let listed = securerun_sandbox::gpu::nvidia_gpus(std::path::Path::new("/"))
            .ok()
            .flatten()
            .is_some_and(|gpus| !gpus.is_empty());
        let checked = crate::worker::device_check(&program, device).and_then(|described| {
            if listed {
                Ok(described)
            } else {
                Err(format!(
                    "the worker reported a usable device ({described}), but the driver lists no GPU in /proc/driver/nvidia/gpus: not believed"
                ))
            }
        });
        match checked {
            Ok(described) => {
                println!("  {name:<17} usable   {described} (as the confined worker reports)")
            }
            Err(e) => {
                ok = false;
                println!("  {name:<17} UNUSABLE {e}");
            }
        }
    }
    if !ok {
        return Err(if gpu {
            format!("the sandbox or the device is not usable for {device} on this host (see above)")
        } else {
            "the sandbox is incomplete on this host (see above)".to_string()
        }
        .into());
    }
    println!("all layers enforced, every probe blocked");
    Ok(())
}
