//! `securerun doctor`: which sandbox layers this host enforces, and escape attempts from inside a
//! confined worker, each of which must be blocked. Exits non-zero if a layer is missing or any
//! probe gets through.

use clap::Args;

use super::CmdResult;

#[derive(Args)]
pub struct DoctorArgs {}

pub fn run(_args: DoctorArgs) -> CmdResult {
    let program = std::env::current_exe()?;
    println!("sandbox layers on this host:");
    let layers = crate::worker::host_layers(&program)?;
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
    for probe in crate::worker::run_probes(&program) {
        ok &= probe.blocked;
        println!(
            "  {:<17} {:<8} {:<45} {}",
            probe.name,
            if probe.blocked { "blocked" } else { "ESCAPED" },
            probe.attempt,
            probe.how
        );
    }
    if !ok {
        return Err("the sandbox is incomplete on this host (see above)".into());
    }
    println!("all layers enforced, every probe blocked");
    Ok(())
}
