//! The `securerun` binary: all logic lives in the library (`securerun::cli`).

fn main() -> std::process::ExitCode {
    securerun::cli::main()
}
