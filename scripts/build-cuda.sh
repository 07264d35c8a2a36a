#!/usr/bin/env bash
# Builds securerun with --features cuda on a machine without a CUDA installation: the toolchain
# (nvcc, cicc/nvvm, ptxas, the runtime and CCCL headers) comes from PyPI's NVIDIA wheels,
# unpacked into .cache/cuda-$CUDA_VERSION (no pip install, no system change).
#
#   scripts/build-cuda.sh                  # release build, target/cuda/release/securerun
#   CUDA_COMPUTE_CAP=90 scripts/build-cuda.sh
#
# CUDA 13.0: the newest release cudarc 0.19 (candle 0.11's) accepts is 13.4, and 13.0 asks the
# least of the host driver. CUDA_COMPUTE_CAP (default 80) is the architecture of the
# statically compiled kernels; candle's other kernels are PTX, which newer GPUs (86, 87, 89,
# 90) compile at load time.
#
# The CUDA libraries are loaded at run time, not linked: candle 0.11 asks cudarc for
# `dynamic-linking`, which would make libcuda.so.1 a load-time dependency, so the binary could not
# even print --version (or serve on the CPU) on a host without the NVIDIA driver, and the worker
# could not choose when the libraries are opened. This script builds against a copy of cudarc
# 0.19.10 (the locked version, from cargo's registry) in which `dynamic-linking` means cudarc's
# own `dynamic-loading`: every CUDA library is dlopen()ed by name on first use, and the worker
# opens them all *before* it confines itself (runtime/worker/gpu.rs). At run time the host needs
# the driver's libcuda.so.1 and, from this toolkit, libcublas(Lt).so.13, libcurand.so.10 and
# libnvrtc.so.13 on the loader's path (LD_LIBRARY_PATH=.cache/cuda-13.0/nvidia/cu13/lib, or
# installed system-wide); without them, `--device cuda` is a clear error and the CPU is unaffected.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION=13.0
root=.cache/cuda-$CUDA_VERSION
wheels=$root/wheels
lib=$root/nvidia/cu13/lib
if [ ! -x "$root/nvidia/cu13/nvvm/bin/cicc" ] || [ ! -e "$lib/libcublas.so.13" ]; then
  mkdir -p "$wheels"
  # pip only downloads here (nothing is installed); a Python without pip gets a venv's.
  pip=(python3 -m pip)
  if ! python3 -m pip --version >/dev/null 2>&1; then
    python3 -m venv "$root/pip-env"
    pip=("$root/pip-env/bin/pip")
  fi
  # Compiler (nvcc, crt, nvvm), headers (runtime, cccl), and the libraries cudarc links
  # (cuBLAS 13.0, cuRAND 10.4 = CUDA 13.0, NVRTC).
  "${pip[@]}" download --quiet --no-deps -d "$wheels" \
    "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-cuda-crt==$CUDA_VERSION.*" \
    "nvidia-cuda-runtime==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" \
    "nvidia-nvvm==$CUDA_VERSION.*" "nvidia-cublas==$CUDA_VERSION.*" \
    "nvidia-cuda-nvrtc==$CUDA_VERSION.*" "nvidia-curand>=10.4,<10.5"
  for w in "$wheels"/*.whl; do
    python3 -m zipfile -e "$w" "$root"
  done
  chmod +x "$root"/nvidia/cu13/bin/* "$root"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
  # Unpacked is all that is used: the archives would only double the disk taken.
  rm -rf "$wheels"
fi
# Link names (the wheels carry only the versioned files).
for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
  ln -sf "lib$l" "$lib/lib${l%%.so.*}.so"
done
# No driver stub on the library path: cudarc tries `libcuda.so` before `libcuda.so.1` at run
# time, and an earlier version of this script left a link stub there.
rm -f "$lib/libcuda.so" "$root/libcuda_stub.c"
# cudarc with `dynamic-linking` read as `dynamic-loading` (see above).
cudarc_version=0.19.10
patched=$root/cudarc-$cudarc_version-loading
if [ ! -f "$patched/.patched-2" ]; then
  cargo fetch --quiet
  src=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"]
           if p["name"] == "cudarc" and p["version"] == sys.argv[1]).rsplit("/", 1)[0])' "$cudarc_version")
  rm -rf "$patched" && cp -r "$src" "$patched"
  # Code gated on linking is never compiled (`any()` is false); the feature itself turns
  # dynamic loading on.
  grep -rlF 'feature = "dynamic-linking"' "$patched" --include='*.rs' \
    | xargs sed -i 's/feature = "dynamic-linking"/any()/g'
  sed -i 's/^dynamic-linking = \[\]$/dynamic-linking = ["dynamic-loading"]/' "$patched/Cargo.toml"
  grep -q '^dynamic-linking = \["dynamic-loading"\]$' "$patched/Cargo.toml"
  touch "$patched/.patched-2"
fi
cuda=$PWD/$root/nvidia/cu13
export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda
export PATH=$cuda/bin:$PATH
# candle's statically compiled kernels (the quantized ones) call the CUDA runtime, and its build
# names `-lcudart`. The link finds only the runtime's static archive (a directory holding it as
# libcudart.a, nothing else): linked in, it opens the driver's library itself when first used,
# so the binary still has no CUDA load-time dependency (check-cuda-build.sh checks).
link=$PWD/$root/link
mkdir -p "$link"
ln -sf "$cuda/lib/libcudart_static.a" "$link/libcudart.a"
export LIBRARY_PATH=$link${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
nvcc --version | tail -2
# Its own target directory: the CPU build's artefacts stay as they are. The patch rewrites
# cudarc's entry in Cargo.lock (a path source has no checksum); the committed lock is restored.
lock_copy=$(mktemp)
cp Cargo.lock "$lock_copy"
trap 'cp "$lock_copy" Cargo.lock; rm -f "$lock_copy"' EXIT
trap 'exit 130' INT TERM HUP
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} cargo build --release --features cuda \
  --config "patch.crates-io.cudarc.path=\"$PWD/$patched\"" --bin securerun "$@"
echo "built ${CARGO_TARGET_DIR:-target/cuda}/release/securerun (CUDA $CUDA_VERSION, compute capability $CUDA_COMPUTE_CAP)"
