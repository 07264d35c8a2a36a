#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the real models, check formatting and lints, run
# every test (unit, generated tiny models, real models against reference outputs, CLI).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
cargo test --workspace --doc
