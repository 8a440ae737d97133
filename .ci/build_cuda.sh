#!/usr/bin/env bash
# Compile the torch-free CUDA kernels (CMake target fastlm_cuda_kernels: sm_80 + sm_90, -Xptxas -v),
# print ptxas's register / spill report, and fail on a compile error or on any spill.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build/cuda-kernels}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
command -v nvcc >/dev/null 2>&1 || { echo "build_cuda.sh: nvcc not found" >&2; exit 1; }

# The kernels target needs no torch; skip the CPU extension so this runs without a Python env.
cmake -S . -B "$BUILD_DIR" -DFASTLM_CUDA=ON -DFASTLM_CPU_EXTENSION=OFF -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >/dev/null
# Force recompilation so ptxas prints its report even when the objects are up to date.
cmake --build "$BUILD_DIR" --target fastlm_cuda_kernels --clean-first -j "${MAX_JOBS:-2}" -- VERBOSE=0 2>&1 | tee "$LOG" >/dev/null || {
  cat "$LOG"; echo "build_cuda.sh: CUDA compile failed" >&2; exit 1; }
if grep -qE "error" "$LOG" && ! grep -q "ptxas info" "$LOG"; then cat "$LOG"; exit 1; fi

echo "== ptxas report (function: registers, spills) =="
awk '
  /Compiling entry function/ { fn = $0; sub(/.*entry function ./, "", fn); arch = fn; sub(/. for .*/, "", fn);
                               sub(/.* for ./, "", arch); sub(/.$/, "", arch); next }
  /spill stores/ { sp = $0; sub(/.*ptxas info *: */, "", sp); spills = sp; next }
  /Used [0-9]+ registers/ { r = $0; sub(/.*Used /, "", r); sub(/ registers.*/, "", r);
                            printf "%-6s regs=%-4s %-55s %s\n", arch, r, spills, fn }
' "$LOG" | sort | (command -v c++filt >/dev/null && c++filt || cat)

n_entries=$(grep -c "Compiling entry function" "$LOG" || true)
n_spill=$(grep -E "bytes spill (stores|loads)" "$LOG" | grep -cvE "0 bytes spill stores, 0 bytes spill loads" || true)
echo "== $n_entries kernel compilations, $n_spill with spills =="
if [ "$n_entries" -eq 0 ]; then echo "build_cuda.sh: no ptxas report found" >&2; exit 1; fi
if [ "$n_spill" -ne 0 ]; then
  grep -E "bytes spill" "$LOG" | grep -vE "0 bytes spill stores, 0 bytes spill loads" >&2
  echo "build_cuda.sh: register spills found" >&2
  exit 1
fi
echo "build_cuda.sh: OK (no spills)"
