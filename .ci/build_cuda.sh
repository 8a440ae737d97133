#!/usr/bin/env bash
# The CUDA compile checks (no GPU needed), failing on any compile error or register spill:
#   1. the torch-free CUDA kernels (CMake target fastlm_cuda_kernels: sm_80 + sm_90, -Xptxas -v);
#   2. the torch binding csrc/cuda/ops_cuda.cu, compiled (not linked) against the active Python's torch
#      headers with setup.py's nvcc flags (SASS for sm_80 and sm_90, PTX for sm_90, the newest), which
#      must carry that PTX. A CPU-only torch wheel ships the c10/cuda and ATen/cuda headers but not
#      two pieces of a CUDA build, supplied by a header shim generated below: the configure-time
#      c10/cuda/impl/cuda_cmake_macros.h, and ATen/cuda/CUDAContext.h, whose real form pulls in the
#      cuBLAS / cuSPARSE / cuSOLVER headers (absent from a minimal CUDA toolkit) while the binding
#      needs only at::cuda::getCurrentCUDAStream.
# Prints ptxas's register / spill report for both.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build/cuda-kernels}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/kernels.log"
BLOG="$WORK/binding.log"

if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
command -v nvcc >/dev/null 2>&1 || { echo "build_cuda.sh: nvcc not found" >&2; exit 1; }
PYTHON="${PYTHON:-python3}"

# 1. The kernels target needs no torch; skip the CPU extension target.
cmake -S . -B "$BUILD_DIR" -DFASTLM_CUDA=ON -DFASTLM_CPU_EXTENSION=OFF -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >/dev/null
# Force recompilation so ptxas prints its report even when the objects are up to date.
cmake --build "$BUILD_DIR" --target fastlm_cuda_kernels --clean-first -j "${MAX_JOBS:-2}" -- VERBOSE=0 2>&1 | tee "$LOG" >/dev/null || {
  cat "$LOG"; echo "build_cuda.sh: CUDA compile failed" >&2; exit 1; }
if grep -qE "error" "$LOG" && ! grep -q "ptxas info" "$LOG"; then cat "$LOG"; exit 1; fi

# 2. The torch binding.
"$PYTHON" -c "import torch" 2>/dev/null || {
  echo "build_cuda.sh: '$PYTHON' cannot import torch (needed for the binding's headers; set PYTHON)" >&2; exit 1; }
SHIM="$WORK/shim"
mkdir -p "$SHIM/c10/cuda/impl" "$SHIM/ATen/cuda"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$SHIM/c10/cuda/impl/cuda_cmake_macros.h"
printf '#pragma once\n#include <c10/cuda/CUDAStream.h>\nnamespace at::cuda { using c10::cuda::getCurrentCUDAStream; }\n' \
  > "$SHIM/ATen/cuda/CUDAContext.h"
mapfile -t TORCH_INC < <("$PYTHON" -c "
import sysconfig
from torch.utils import cpp_extension
for p in cpp_extension.include_paths():
    print('-I' + p)
print('-I' + sysconfig.get_paths()['include'])
print('-D_GLIBCXX_USE_CXX11_ABI=%d' % int(__import__('torch').compiled_with_cxx11_abi()))")
# setup.py's nvcc flags (FASTLM_CUDA_ARCHS defaults to 80;90, plus PTX for the newest)
nvcc -c csrc/cuda/ops_cuda.cu -o "$WORK/ops_cuda.o" -O3 -std=c++17 --expt-relaxed-constexpr -Xptxas -v \
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -U__CUDA_NO_HALF2_OPERATORS__ -DFASTLM_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
  -diag-suppress 3306 -I"$SHIM" -Icsrc/include -Icsrc "${TORCH_INC[@]}" \
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90 \
  > "$BLOG" 2>&1 || { cat "$BLOG"; echo "build_cuda.sh: the torch binding (csrc/cuda/ops_cuda.cu) failed to compile" >&2; exit 1; }
CUOBJDUMP="$(command -v cuobjdump || "$PYTHON" -c "from triton import knobs; print(knobs.nvidia.cuobjdump.path)" 2>/dev/null || true)"
if [ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ]; then
  "$CUOBJDUMP" --list-ptx "$WORK/ops_cuda.o" | grep -q "sm_90.ptx" || {
    echo "build_cuda.sh: no sm_90 PTX embedded in the binding" >&2; exit 1; }
  echo "== binding: SASS $("$CUOBJDUMP" --list-elf "$WORK/ops_cuda.o" | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')+ PTX sm_90"
fi

report() {  # $1: log, $2: title
  echo "== ptxas report: $2 (function: registers, spills) =="
  awk '
    /Compiling entry function/ { fn = $0; sub(/.*entry function ./, "", fn); arch = fn; sub(/. for .*/, "", fn);
                                 sub(/.* for ./, "", arch); sub(/.$/, "", arch); next }
    /spill stores/ { sp = $0; sub(/.*ptxas info *: */, "", sp); spills = sp; next }
    /Used [0-9]+ registers/ { r = $0; sub(/.*Used /, "", r); sub(/ registers.*/, "", r);
                              printf "%-6s regs=%-4s %-55s %s\n", arch, r, spills, fn }
  ' "$1" | sort | (command -v c++filt >/dev/null && c++filt || cat)
}
report "$LOG" "torch-free kernels"
report "$BLOG" "torch binding"

status=0
for log in "$LOG" "$BLOG"; do
  n_entries=$(grep -c "Compiling entry function" "$log" || true)
  n_spill=$(grep -E "bytes spill (stores|loads)" "$log" | grep -cvE "0 bytes spill stores, 0 bytes spill loads" || true)
  what=$([ "$log" = "$LOG" ] && echo "kernels" || echo "binding")
  echo "== $what: $n_entries kernel compilations, $n_spill with spills =="
  if [ "$n_entries" -eq 0 ]; then echo "build_cuda.sh: no ptxas report found for the $what" >&2; status=1; fi
  if [ "$n_spill" -ne 0 ]; then
    grep -E "bytes spill" "$log" | grep -vE "0 bytes spill stores, 0 bytes spill loads" >&2
    echo "build_cuda.sh: register spills found in the $what" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] || exit 1
echo "build_cuda.sh: OK (kernels and torch binding compile; no spills)"
