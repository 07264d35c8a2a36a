#!/usr/bin/env bash
# The main job on a real model: fetch SmolLM2-135M-Instruct, build securerun, inspect the model,
# pack it into one self-contained file, sign it with a site key, and chat with it (verified).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh
cargo build --release
bin=./target/release/securerun
model=.cache/models/smollm2-135m-instruct
packed=.cache/models/smollm2.safetensors
keys=.cache/keys
mkdir -p "$keys"
[ -f "$keys/site.key" ] || $bin keygen --out "$keys/site"

$bin inspect "$model" | head -12
$bin pack "$model" --out "$packed" --force
$bin sign "$packed" --key "$keys/site.key"
$bin verify "$packed" --trust-key "$keys/site.pub"
echo "--- securerun run (greedy) ---"
$bin run "$packed" --trust-key "$keys/site.pub" --prompt "The capital of France is" \
  --max-tokens 16 --temperature 0
echo
echo "--- securerun run --chat ---"
$bin run "$packed" --trust-key "$keys/site.pub" --chat \
  --prompt "${1:-What is the capital of France?}" --max-tokens 64 --temperature 0 --verbose
