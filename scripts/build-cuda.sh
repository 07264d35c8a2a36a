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
# The binary links the CUDA libraries (cudarc's dynamic linking): it needs the NVIDIA driver's
# libcuda.so.1 and, from this toolkit, libcublas.so.13 and libcurand.so.10 at run time
# (LD_LIBRARY_PATH=.cache/cuda-13.0/nvidia/cu13/lib, or install them beside it). The driver
# library is not on PyPI: the link uses a stub libcuda.so (SONAME libcuda.so.1, every driver
# entry point cudarc declares, each empty), made here as NVIDIA's own toolkit ships one; at run
# time the real driver's library is loaded instead.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION=13.0
root=.cache/cuda-$CUDA_VERSION
wheels=$root/wheels
lib=$root/nvidia/cu13/lib
if [ ! -x "$root/nvidia/cu13/nvvm/bin/cicc" ] || [ ! -e "$lib/libcublas.so.13" ]; then
  mkdir -p "$wheels"
  # Compiler (nvcc, crt, nvvm), headers (runtime, cccl), and the libraries cudarc links
  # (cuBLAS 13.0, cuRAND 10.4 = CUDA 13.0, NVRTC).
  python3 -m pip download --quiet --no-deps -d "$wheels" \
    "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-cuda-crt==$CUDA_VERSION.*" \
    "nvidia-cuda-runtime==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" \
    "nvidia-nvvm==$CUDA_VERSION.*" "nvidia-cublas==$CUDA_VERSION.*" \
    "nvidia-cuda-nvrtc==$CUDA_VERSION.*" "nvidia-curand>=10.4,<10.5"
  for w in "$wheels"/*.whl; do
    python3 -m zipfile -e "$w" "$root"
  done
  chmod +x "$root"/nvidia/cu13/bin/* "$root"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
fi
# Link names (the wheels carry only the versioned files).
for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
  ln -sf "lib$l" "$lib/lib${l%%.so.*}.so"
done
# The driver's link stub.
if [ ! -e "$lib/libcuda.so" ]; then
  cudarc=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
  grep -ohE "pub (unsafe )?fn cu[A-Z][A-Za-z0-9_]*" "$cudarc/src/driver/sys/mod.rs" \
    | awk '{print $NF}' | sort -u | sed 's/.*/void &(void) {}/' > "$root/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$root/libcuda_stub.c"
fi
cuda=$PWD/$root/nvidia/cu13
export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda
export PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
nvcc --version | tail -2
# Its own target directory: the CPU build's artefacts stay as they are.
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} cargo build --release --features cuda --bin securerun "$@"
echo "built ${CARGO_TARGET_DIR:-target/cuda}/release/securerun (CUDA $CUDA_VERSION, compute capability $CUDA_COMPUTE_CAP)"
