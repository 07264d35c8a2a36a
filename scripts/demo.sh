#!/usr/bin/env bash
# The main job on a real model: fetch SmolLM2-135M-Instruct, build securerun, inspect the model,
# pack it into one self-contained file, and chat with it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh
cargo build --release
model=.cache/models/smollm2-135m-instruct
./target/release/securerun inspect "$model" | head -12
./target/release/securerun pack "$model" --out .cache/models/smollm2.safetensors --force
echo "--- securerun run (greedy) ---"
./target/release/securerun run .cache/models/smollm2.safetensors --prompt "The capital of France is" \
  --max-tokens 16 --temperature 0
echo
echo "--- securerun run --chat ---"
./target/release/securerun run .cache/models/smollm2.safetensors --chat \
  --prompt "${1:-What is the capital of France?}" --max-tokens 64 --temperature 0 --verbose
