#!/usr/bin/env bash
# Signature verification throughput: `securerun verify` (hashing every file in parallel, through
# read-only mappings) against `sha256sum` over the same files and the reference
# `model_signing verify key`. Warm page cache (each command runs once before it is timed).
#
#   benches/hashing.sh          # after scripts/fetch-models.sh and scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/securerun
ms=${SECURERUN_MODEL_SIGNING:-.cache/signing-env/bin/model_signing}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet

$bin keygen --out "$work/k" 2>/dev/null
packed=$work/smollm2.safetensors
$bin pack .cache/models/smollm2-135m-instruct --out "$packed" 2>/dev/null
cp -r .cache/models/smollm2-135m-instruct "$work/dir"
$bin sign "$packed" --key "$work/k.key" 2>/dev/null
$bin sign "$work/dir" --key "$work/k.key" 2>/dev/null

timeit() { # LABEL BYTES CMD...
  local label=$1 bytes=$2; shift 2
  "$@" >/dev/null 2>&1
  local t0 t1
  t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
  python3 -c "import sys; t=$t1-$t0; print(f'{sys.argv[1]:<44} {t:6.3f} s  {$bytes/t/1e9:5.2f} GB/s')" "$label"
}
for target in "$packed" "$work/dir"; do
  bytes=$(find "$target" -type f ! -name '*.sig' -printf '%s\n' | awk '{s+=$1} END {print s}')
  name=$(basename "$target")
  echo "== $name: $bytes bytes, $(nproc) cores"
  timeit "securerun verify" "$bytes" $bin verify "$target" --trust-key "$work/k.pub"
  timeit "sha256sum (sequential)" "$bytes" sh -c "find '$target' -type f ! -name '*.sig' -print0 | xargs -0 sha256sum"
  sig=$target.sig; [ -d "$target" ] && sig=$target/model.sig
  timeit "model_signing verify key (reference)" "$bytes" "$ms" verify key --public_key "$work/k.pub" --signature "$sig" "$target"
done
