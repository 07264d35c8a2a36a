#!/usr/bin/env bash
# Checks the CUDA build (scripts/build-cuda.sh) on a host WITHOUT a GPU, as CI is: what must
# hold before a GPU is ever involved. Exits non-zero at the first broken promise.
#
#   scripts/check-cuda-build.sh [BINARY]     # default target/cuda/release/securerun
#
# 1. No CUDA library is a load-time dependency: the binary starts on any host.
# 2. It says it was built with CUDA.
# 3. On the CPU it answers as the CPU build does (the real SmolLM2 model, confined).
# 4. `--device cuda` without a driver is a clear error naming the driver, confined or not,
#    and never an answer computed on the CPU instead.
# 5. `doctor --device cuda`: every escape refused under the GPU profile, the device line names
#    the missing driver, the command fails.
# 6. With a stand-in driver (a libcuda.so.1 made here: every entry point cudarc declares, each
#    answering "no device"; its cuInit first tries to open a file this script made, a terminal
#    ioctl on the worker's channel and shared anonymous memory, as a compromised driver could)
#    and the toolkit's real cuBLAS/cuRAND: the worker loads every library
#    from a directory it is never granted, confines itself with the GPU profile, and only then
#    initialises the driver, which finds the host's files closed. --sandbox off shows the
#    stand-in telling the two apart.
# GPU checks proper are scripts/test-gpu.sh, on a machine with one.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/cuda/release/securerun}
model=.cache/models/smollm2-135m-instruct
fail() { echo "check-cuda-build: FAILED: $*" >&2; exit 1; }

needed=$(readelf -d "$bin" | awk '/NEEDED/ {print $NF}')
if grep -Eq 'cuda|cublas|curand|nvrtc' <<<"$needed"; then
  fail "CUDA libraries are load-time dependencies: $needed"
fi
echo "ok: no CUDA library is needed at load time"

"$bin" --version | grep -q 'features: cuda' || fail "--version does not say cuda: $("$bin" --version)"
echo "ok: --version names the cuda feature"

answer=$("$bin" run "$model" --allow-unsigned --prompt "The capital of France is" --max-tokens 4 2>/dev/null)
grep -q 'Paris' <<<"$answer" || fail "the CPU answer changed: $answer"
echo "ok: the CPU path answers as before (confined)"

for sandbox in strict off; do
  if out=$("$bin" run "$model" --allow-unsigned --prompt x --device cuda --sandbox "$sandbox" 2>&1); then
    fail "--device cuda --sandbox $sandbox succeeded without a GPU: $out"
  fi
  grep -q 'no NVIDIA driver on this host' <<<"$out" || fail "--sandbox $sandbox: unclear error: $out"
done
echo "ok: --device cuda without a driver is refused, confined or in process"

if out=$("$bin" doctor --device cuda 2>&1); then
  fail "doctor --device cuda passed without a GPU: $out"
fi
grep -q 'ESCAPED' <<<"$out" && fail "an escape got through under the GPU profile: $out"
grep -Eq 'cuda:0 +UNUSABLE no NVIDIA driver on this host' <<<"$out" || fail "doctor's device line: $out"
for probe in read-file create-file network exec fork ptrace other-device thread-flood; do
  grep -Eq "^  $probe +blocked" <<<"$out" || fail "probe $probe under the GPU profile: $out"
done
echo "ok: doctor --device cuda refuses every escape and names the missing driver"
cuda_lib=.cache/cuda-13.0/nvidia/cu13/lib
cudarc=.cache/cuda-13.0/cudarc-0.19.10-loading
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
{
  cat <<C
#define SECRET "$stub/secret"
C
  cat <<'C'
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
enum { NO_DEVICE = 100, OPENED = 999, IOCTL = 998, SHARED = 997 };
/* What a driver could do at initialisation, or a compromised one: each must be refused when
   cuInit runs confined. */
static int probe_host(void) {
  int fd = open(SECRET, O_RDONLY | O_CLOEXEC);
  if (fd >= 0) { close(fd); return OPENED; }
  int n = 0;
  if (ioctl(3, FIONREAD, &n) == 0) return IOCTL;
  void *p = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p != MAP_FAILED) { munmap(p, 1 << 20); return SHARED; }
  return NO_DEVICE;
}
int cuInit(unsigned flags) { (void)flags; return probe_host(); }
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuGetErrorString(int e, const char **s) {
  *s = e == OPENED ? "stand-in driver: it opened a host file, so CUDA was initialised unconfined"
     : e == IOCTL ? "stand-in driver: a terminal ioctl got through on the channel"
     : e == SHARED ? "stand-in driver: it mapped shared anonymous memory"
     : "stand-in driver: no device, and host files were closed to it";
  return 0;
}
int cuGetErrorName(int e, const char **s) {
  *s = e == NO_DEVICE ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN";
  return 0;
}
C
  grep -ohE "pub (unsafe )?fn cu[A-Z][A-Za-z0-9_]*" "$cudarc/src/driver/sys/mod.rs" \
    | awk '{print $NF}' | sort -u \
    | grep -vxE 'cuInit|cuDriverGetVersion|cuGetErrorString|cuGetErrorName' \
    | sed 's/.*/int &(void) { return NO_DEVICE; }/'
} > "$stub/driver.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so.1" "$stub/driver.c"
echo "a host file the worker must not read" > "$stub/secret"
export LD_LIBRARY_PATH=$stub:$PWD/$cuda_lib
if out=$("$bin" run "$model" --allow-unsigned --prompt x --device cuda 2>&1); then
  fail "the stand-in driver produced an answer: $out"
fi
grep -q 'cannot use CUDA device 0' <<<"$out" && grep -q 'host files were closed to it' <<<"$out" \
  || fail "confined: the driver was not initialised after confinement: $out"
out=$("$bin" run "$model" --allow-unsigned --prompt x --device cuda --sandbox off 2>&1) || true
grep -q 'it opened a host file' <<<"$out" || fail "unconfined, the stand-in should open files: $out"
if out=$("$bin" doctor --device cuda 2>&1); then
  fail "doctor passed on the stand-in driver: $out"
fi
grep -Eq 'cuda:0 +UNUSABLE cannot use CUDA device 0: .*host files were closed to it' <<<"$out" \
  || fail "doctor with the stand-in driver: $out"
echo "ok: libraries loaded before confinement, the driver initialised after it (stand-in driver)"
echo "check-cuda-build: all checks passed ($bin)"
