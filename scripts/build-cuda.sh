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
# STATUS (issue 17, in progress): the PyPI toolchain works. nvcc 13.0 compiles every candle
# kernel (candle-kernels, cudarc, candle-core with `cuda`: about 8.5 min from scratch on 2 cores).
# The final link still fails: cudarc links the CUDA libraries at build time (-lcuda, -lcudart,
# -lcublas, -lcublasLt, -lcurand, -lnvrtc). The missing pieces are the cuBLAS, cuRAND and
# NVRTC wheels, `libcudart.so` (the wheel has only `.so.13`), and a `libcuda.so` link stub
# (the driver library is not on PyPI). Until then the script stops at the link with those
# errors.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION=13.0
root=.cache/cuda-$CUDA_VERSION
wheels=$root/wheels
if [ ! -x "$root/nvidia/cu13/bin/nvcc" ] || [ ! -x "$root/nvidia/cu13/nvvm/bin/cicc" ]; then
  mkdir -p "$wheels"
  python3 -m pip download --quiet --no-deps -d "$wheels" \
    "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-cuda-crt==$CUDA_VERSION.*" \
    "nvidia-cuda-runtime==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" \
    "nvidia-nvvm==$CUDA_VERSION.*"
  for w in "$wheels"/*.whl; do
    python3 -m zipfile -e "$w" "$root"
  done
  chmod +x "$root"/nvidia/cu13/bin/* "$root"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
fi
cuda=$PWD/$root/nvidia/cu13
export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda
export PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
nvcc --version | tail -2
# Its own target directory: the CPU build's artefacts stay as they are.
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} cargo build --release --features cuda --bin securerun "$@"
echo "built ${CARGO_TARGET_DIR:-target/cuda}/release/securerun (CUDA $CUDA_VERSION, compute capability $CUDA_COMPUTE_CAP)"
