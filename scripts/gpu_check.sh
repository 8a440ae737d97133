#!/usr/bin/env bash
# The one-shot device check, for a machine with one NVIDIA GPU:
#   bash scripts/gpu_check.sh OUT_DIR            run it (< 8 minutes on one H100/H200)
#   bash scripts/gpu_check.sh --dry-run OUT_DIR  every step before the first CUDA call: prerequisites, the
#                                                plan, the test selection and the benchmark cases
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (plus each stage's log, tests.xml, bench-*/).
#
# Stages, in order, each under `timeout` (scripts/gpu_check.py's STAGES holds the caps):
#   device     the GPU's properties and peak HBM bandwidth (the first CUDA call)
#   build      pip install -e . (no deps, no index): fastlm._C with the CUDA kernels for this GPU's arch
#   tests      the GPU test mode (README, "GPU"): Triton kernel tests on CUDA tensors, CUDA C++ and Triton
#              kernels vs the references, model parity per family in fp16/bf16, the engine with CUDA graphs
#   decode     `fastlm bench decode`: engine tokens/s vs HF generate and HF static cache + torch.compile,
#              random-weight Helium-1 2B and StableLM-2 1.6B in bf16
#   attention  `fastlm bench attention`: decode attention vs SDPA (and flash-attn when installed)
#   kernels    `fastlm bench kernels`: each fused kernel vs eager and torch.compile
#   report     gpu_check.py report: the tables, achieved bandwidth as % of the card's peak
# Sizing (one H100/H200 machine, 16 cores; estimates, no GPU run yet): device 5 s, build ~90 s (8 C++ and
# CUDA translation units in parallel, one arch), tests ~100 s (xdist, 8 workers: ~300 Triton
# specialisations to JIT at ~1 s each plus the model tests), decode ~90 s (two ~2B models built twice,
# 7 providers x 1+3 generate pairs of 16 tokens, static-compile capped at 40 s a model), attention ~40 s
# (24 cases x 4 providers), kernels ~60-100 s (24 cases; torch.compile only at the prefill shape, 8
# compiles). The caps (15+110+120+95+40+60 = 440 s; report 20 s; 10 s grace for one killed stage: 470 s)
# bound the total whatever the estimates: a stage gets min(its cap, what is left of 440 s); the kernels stage drops torch.compile when
# under 60 s are left; a stage that runs out is killed and reported as timed out (bench stages keep the
# rows they finished).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; fi
OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # Triton's current default, stated
unset TRITON_INTERPRET  # the GPU test mode: compiled kernels on CUDA tensors

if [ "$DRY" -eq 1 ]; then
  exec "$PY" scripts/gpu_check.py plan "$OUT"
fi

START=$(date +%s)
BUDGET=$("$PY" -c "import sys; sys.path.insert(0, 'scripts'); import gpu_check; print(gpu_check.BUDGET_S)")
cap_of() { "$PY" -c "import sys; sys.path.insert(0, 'scripts'); import gpu_check; print(dict((n, c) for n, c, _ in gpu_check.STAGES)['$1'])"; }
: > "$OUT/stages.tsv"

stage() {  # stage NAME CMD...: run under min(cap, what is left), log to OUT/NAME.log, record rc and time
  local name=$1; shift
  local cap left t0 rc
  cap=$(cap_of "$name")
  left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 5 ]; then
    printf '%s\t124\t0\t%s\n' "$name" "$cap" >> "$OUT/stages.tsv"
    echo "== $name: skipped (the time budget is spent)"; return 124
  fi
  echo "== $name (cap ${cap}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$cap" >> "$OUT/stages.tsv"
  tail -n 3 "$OUT/$name.log"
  return $rc
}

stage device "$PY" scripts/gpu_check.py device "$OUT"
ARCH=$("$PY" -c "import json; print(json.load(open('$OUT/device.json'))['sm'])" 2>/dev/null || echo 90)
JOBS=$(nproc)
stage build env FASTLM_CUDA_ARCHS="$ARCH" MAX_JOBS="$JOBS" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
WORKERS=1
"$PY" -c "import xdist" 2>/dev/null && WORKERS=$(( JOBS < 8 ? JOBS : 8 ))
mapfile -t TESTS < <("$PY" -c "
import sys; sys.path.insert(0, 'scripts'); import gpu_check
print('\n'.join(gpu_check.test_command('$OUT', $WORKERS)))")
stage tests "${TESTS[@]}"
bench_stage() {  # bench_stage NAME [nocompile]
  mapfile -t CMD < <("$PY" -c "
import sys; sys.path.insert(0, 'scripts'); import gpu_check
print('\n'.join(gpu_check.bench_command('$1', '$OUT', compile_=${2:-True})))")
  stage "$1" "${CMD[@]}"
}
bench_stage decode
bench_stage attention
if [ $(( BUDGET - ($(date +%s) - START) )) -lt 60 ]; then bench_stage kernels False; else bench_stage kernels; fi
timeout 20 "$PY" scripts/gpu_check.py report "$OUT"
echo "gpu_check: $(( $(date +%s) - START )) s in all"
