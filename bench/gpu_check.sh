#!/usr/bin/env bash
# One-shot GPU check of the compiled extension, sized for a lent H100/H200 (under 8 minutes):
#   1. build llama2_C with its CUDA kernels for this GPU (pip install --no-build-isolation -e .)
#   2. the kernel tests: tests/test_kernels_cuda.py (CUDA vs float64) and tests/test_kernels.py
#   3. the benchmark: bench/bench_ops.py --device cuda
# and a short summary at the end. Logs go to $OUT (the device tool's output folder) or
# /tmp/gpu_check.
#
#     bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

LOGS="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0))"

# Build for this GPU's architecture only (e.g. 9.0 on Hopper): faster, and the code it will run.
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "building for sm_${CAP/./} with $MAX_JOBS jobs"

declare -A STATUS SECONDS_TAKEN

# run_step NAME LIMIT_SECONDS COMMAND...: runs under timeout, logs to $LOGS/NAME.log, never exits.
run_step() {
  local name=$1 limit=$2
  shift 2
  local start rc=0
  start=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  SECONDS_TAKEN[$name]=$(($(date +%s) - start))
  if [ "$rc" -eq 0 ]; then
    STATUS[$name]=ok
  elif [ "$rc" -eq 124 ]; then
    STATUS[$name]="TIMEOUT after ${limit}s"
  else
    STATUS[$name]="FAILED (exit $rc)"
  fi
  echo "== $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s (log: $LOGS/$name.log)"
}

run_step build 240 "$PY" -m pip install --no-build-isolation --no-index --no-deps -v -e .
if [ "${STATUS[build]}" != ok ]; then
  grep -n -i -B2 -A8 "error" "$LOGS/build.log" | head -80 || tail -60 "$LOGS/build.log"
  exit 1
fi
"$PY" -c "import llama2_kernels as K; assert K.has_cuda(), 'llama2_C has no CUDA kernels'; \
print('llama2_C CUDA kernels registered')"

TESTS=(tests/test_kernels_cuda.py)
[ -f tests/test_kernels.py ] && TESTS+=(tests/test_kernels.py)
run_step tests 200 "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
tail -25 "$LOGS/tests.log"

if [ -f bench/bench_ops.py ]; then
  run_step bench 120 "$PY" bench/bench_ops.py --device cuda
  tail -40 "$LOGS/bench.log"
else
  STATUS[bench]="MISSING bench/bench_ops.py"
  SECONDS_TAKEN[bench]=0
fi

echo
echo "==================== gpu_check summary ===================="
nvidia-smi --query-gpu=name --format=csv,noheader
printf "%-8s %-32s %6s\n" step status seconds
for s in build tests bench; do
  printf "%-8s %-32s %6s\n" "$s" "${STATUS[$s]}" "${SECONDS_TAKEN[$s]}"
done
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$LOGS/tests.log" | tail -1 || true
echo "total $(($(date +%s) - T0))s"
for s in build tests bench; do
  [ "${STATUS[$s]}" = ok ] || exit 1
done
