#!/usr/bin/env bash
# The GPU checks of the CUDA build, in one short command on a machine with an NVIDIA GPU, its
# driver and the CUDA 13 cuBLAS/cuRAND libraries. Build on the CPU machine, carry the binary:
#
#   CUDA_COMPUTE_CAP=90 scripts/build-cuda.sh          # here (90: H100/H200 native code)
#   scripts/test-gpu.sh [BINARY] [TEXT_MODEL] [EMBEDDING_MODEL]    # there
#
# Defaults: target/cuda/release/securerun and the models of scripts/fetch-models.sh. A model
# that is absent is skipped, and said so. Results go to stdout and, as a Markdown table for
# docs/benchmarks.md, to $OUT/gpu-results.md (or ./gpu-results.md).
#
# Checks, each failing the script:
# 1. `doctor --device cuda`: every layer enforced and every escape refused under the GPU
#    profile, and the confined worker initialises the device and computes on it (cuBLAS, a
#    compiled kernel) with its threads capped. Under a runtime without landlock (gVisor) the
#    strict sandbox cannot start: that is reported, and the rest runs with
#    SANDBOX=permissive, named in every result.
# 2. Correctness: greedy answers of the confined GPU worker against the CPU f32 reference on
#    the reference prompts: f32 on the GPU equal to the CPU's; bf16 the same first three words
#    (bf16 rounds every product; the issue's "within bf16 tolerance"); q8_0 (candle's quantized
#    kernels) is shown beside them, not required to agree (quantization changes late tokens).
#    Embeddings: cosine of the GPU vector to the CPU's >= 0.999.
# 3. Speed: prompt and decode tok/s on the GPU (bf16, q8_0) and the CPU (auto), from `run -v`.
# 4. Batching on the GPU: `securerun serve --device cuda` (bf16, then q8_0; the confined
#    worker, default max_sequences 4) answers 4 prompts one client at a time, then 4 clients at once: each
#    concurrent answer keeps its lone answer's first three words (bf16 tolerance: a row's sums
#    may differ with the batch's shape), and the aggregate tok/s of the 4 is shown against one
#    client's.
#
# The libraries: LD_LIBRARY_PATH as given, else the first of .cache/cuda-13.0/nvidia/cu13/lib,
# python3's nvidia/cu13/lib (PyPI's nvidia-cublas, as PyTorch cu13 images have), and
# /usr/local/cuda/lib64 that holds libcublas.so.13.
#
# DEVICE=cpu runs the script's own logic with the CPU in the GPU's place (a dry run on a
# machine without a GPU; check 1 is then plain `doctor`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/cuda/release/securerun}
text_model=${2:-.cache/models/smollm2-135m-instruct}
embed_model=${3:-.cache/models/all-minilm-l6-v2}
device=${DEVICE:-cuda}
sandbox=${SANDBOX:-strict}
results=${OUT:-.}/gpu-results.md
fail() { echo "test-gpu: FAILED: $*" >&2; exit 1; }

if [ -z "${LD_LIBRARY_PATH:-}" ] || ! ls "${LD_LIBRARY_PATH%%:*}"/libcublas.so.13 >/dev/null 2>&1; then
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  for dir in "$PWD/.cache/cuda-13.0/nvidia/cu13/lib" "$site/nvidia/cu13/lib" /usr/local/cuda/lib64; do
    if [ -e "$dir/libcublas.so.13" ]; then
      export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      break
    fi
  done
fi
echo "libraries: ${LD_LIBRARY_PATH:-(loader defaults)}"
gpu_name=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
echo "device: ${gpu_name:-unknown (no nvidia-smi)}; binary: $("$bin" --version | tr '\n' ' ')"

# 1. The sandbox and the device, from a confined worker.
doctor_args=(doctor)
[ "$device" = cpu ] || doctor_args+=(--device "$device")
if doctor=$("$bin" "${doctor_args[@]}" 2>&1); then
  echo "$doctor"
  echo "ok: doctor ${doctor_args[*]:1}"
else
  echo "$doctor"
  if grep -Eq 'MISSING' <<<"$doctor" && [ "$sandbox" = strict ]; then
    echo "the strict sandbox cannot be enforced on this host (see MISSING above): continuing with SANDBOX=permissive"
    sandbox=permissive
  fi
  grep -q 'ESCAPED' <<<"$doctor" && fail "an escape got through under the GPU profile"
  grep -q 'UNUSABLE' <<<"$doctor" && fail "the device is not usable from a confined worker"
fi

run() { # DEVICE DTYPE PROMPT [extra args]: the greedy answer; speed on stderr
  local dev=$1 dtype=$2 prompt=$3
  shift 3
  "$bin" run "$text_model" --allow-unsigned --device "$dev" --dtype "$dtype" --sandbox "$sandbox" \
    --temperature 0 --prompt "$prompt" "$@" 2>"$tmp/err" || { cat "$tmp/err" >&2; return 1; }
}
words() { tr -s '[:space:]' ' ' <<<"$1" | sed 's/^ //' | cut -d' ' -f1-"$2"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "| check | result |"
  echo "|---|---|"
} >"$results"
note() { echo "$1: $2"; echo "| $1 | $2 |" >>"$results"; }

# 2. Correctness against the CPU f32 reference.
if [ -d "$text_model" ]; then
  prompts=("The capital of France is" "def fibonacci(n):" "Water boils at a temperature of")
  for prompt in "${prompts[@]}"; do
    reference=$(run cpu f32 "$prompt" --max-tokens 16)
    gpu_f32=$(run "$device" f32 "$prompt" --max-tokens 16)
    gpu_bf16=$(run "$device" bf16 "$prompt" --max-tokens 16)
    gpu_q8=$(run "$device" q8_0 "$prompt" --max-tokens 16)
    [ "$gpu_f32" = "$reference" ] || fail "f32 on $device differs from the CPU on \"$prompt\": \"$gpu_f32\" vs \"$reference\""
    [ "$(words "$gpu_bf16" 3)" = "$(words "$reference" 3)" ] \
      || fail "bf16 on $device leaves the CPU's answer on \"$prompt\": \"$gpu_bf16\" vs \"$reference\""
    note "greedy \"$prompt\", $device vs CPU f32 ($sandbox)" \
      "f32 equal (\"$(words "$reference" 5)…\"); bf16 \"$(words "$gpu_bf16" 5)…\"; q8_0 \"$(words "$gpu_q8" 5)…\""
  done
  # 3. Speed: a long prompt (prefill) and 128 generated tokens (decode).
  long=$(printf 'The history of the printing press begins in the fifteenth century. %.0s' {1..20})
  for pair in "$device bf16" "$device q8_0" "cpu auto"; do
    set -- $pair
    run "$1" "$2" "$long" --max-tokens 128 -v >/dev/null
    speed=$(grep -o 'prompt .*tok/s), generated .*tok/s)' "$tmp/err" | tail -1)
    note "speed on $1, $2 ($sandbox)" "$speed"
  done
else
  note "text model" "none at $text_model: correctness and speed skipped"
fi

# 4. Batching through the server, at bf16 and at q8_0 (candle's quantized kernels).
batching_check() { # DTYPE
  local dtype=$1 state=$tmp/state-$1
  mkdir -p "$state"
  token=$("$bin" token create --name gpu-test --scopes inference --state-dir "$state" 2>/dev/null | tail -1)
  "$bin" serve "$text_model" --allow-unsigned --device "$device" --dtype "$dtype" --sandbox "$sandbox" \
    --listen 127.0.0.1:0 --state-dir "$state" >"$tmp/serve.out" 2>"$tmp/serve.err" &
  server=$!
  for _ in $(seq 1 600); do
    grep -q '^listening on' "$tmp/serve.out" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$tmp/serve.err" >&2; fail "serve --device $device --dtype $dtype did not start"; }
    sleep 0.2
  done
  line=$(grep '^listening on' "$tmp/serve.out") || fail "serve --device $device did not listen in 120 s"
  url=$(awk '{print $3}' <<<"$line")
  model=$(sed -E 's/.*\(models ([^,)]+).*/\1/' <<<"$line")
  batching=$(python3 - "$url" "$token" "$model" <<'PY'
import json, sys, threading, time, urllib.request
url, token, model = sys.argv[1:4]
prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colours are"]
def complete(prompt, out, i):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {
        "authorization": "Bearer " + token, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        reply = json.load(r)
    out[i] = (reply["choices"][0]["text"], reply["usage"]["completion_tokens"])
alone = [None] * 4
t0 = time.monotonic()
for i, p in enumerate(prompts):
    complete(p, alone, i)
one = sum(n for _, n in alone) / (time.monotonic() - t0)
together = [None] * 4
threads = [threading.Thread(target=complete, args=(p, together, i)) for i, p in enumerate(prompts)]
t0 = time.monotonic()
for t in threads: t.start()
for t in threads: t.join()
four = sum(x[1] for x in together if x) / (time.monotonic() - t0)
words = lambda t: " ".join(t.split()[:3])
bad = [prompts[i] for i in range(4) if together[i] is None or words(together[i][0]) != words(alone[i][0])]
print(json.dumps({"one": round(one, 1), "four": round(four, 1), "ratio": round(four / one, 2), "differ": bad}))
PY
  ) || { kill "$server" 2>/dev/null; cat "$tmp/serve.err" >&2; fail "the batching check could not run"; }
  kill -TERM "$server" 2>/dev/null
  wait "$server" 2>/dev/null || true
  grep -q '"differ": \[\]' <<<"$batching" || fail "batched $dtype answers on $device left their lone answers: $batching"
  note "batching, serve --device $device $dtype, 4 clients vs 1 ($sandbox)" "$batching (aggregate tok/s)"
}
if [ -d "$text_model" ]; then
  batching_check bf16
  batching_check q8_0
fi

if [ -d "$embed_model" ]; then
  embed() {
    "$bin" embed "$embed_model" --allow-unsigned --device "$1" --sandbox "$sandbox" \
      --text "A man is eating food." 2>/dev/null
  }
  cosine=$(python3 -c '
import json, math, sys
a, b = (json.loads(x) for x in sys.argv[1:3])
a, b = a[0], b[0]
dot = sum(x * y for x, y in zip(a, b))
print(round(dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)), 6))' "$(embed cpu)" "$(embed "$device")")
  python3 -c "import sys; sys.exit(0 if float('$cosine') >= 0.999 else 1)" \
    || fail "the $device embedding's cosine to the CPU's is $cosine"
  note "embedding, $device vs CPU f32 ($sandbox)" "cosine $cosine"
else
  note "embedding model" "none at $embed_model: skipped"
fi
echo "test-gpu: all checks passed on $device (${gpu_name:-no nvidia-smi}); table in $results"
