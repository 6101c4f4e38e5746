#!/usr/bin/env bash
# One-shot GPU check of the compiled extension, sized for a lent H100/H200 (under 8 minutes: the
# step timeouts add up to 470 s, and a step that would start past 7 minutes is skipped):
#   1. build llama2_C with its CUDA kernels for this GPU (pip install --no-build-isolation -e .)
#   2. compute-sanitizer memcheck, racecheck, synccheck and initcheck, in parallel, each on the six
#      tiny cases of bench/sanitize_cases.py (every kernel, forward and backward)
#   3. the kernel tests: tests/test_kernels_cuda.py (CUDA vs float64) and tests/test_kernels.py
#   4. the benchmark: bench/bench_ops.py --device cuda (RMSNorm/RoPE inputs >= 4x the L2 cache,
#      torch.compile'd references as baselines)
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
# A step that would start past 7 minutes is skipped (the whole check stays under 8).
run_step() {
  local name=$1 limit=$2
  shift 2
  local start rc=0
  if [ $(($(date +%s) - T0)) -gt 420 ]; then
    STATUS[$name]="SKIPPED (past 7 minutes)"
    SECONDS_TAKEN[$name]=0
    echo "== $name: ${STATUS[$name]}"
    return
  fi
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

run_step build 160 "$PY" -m pip install --no-build-isolation --no-index --no-deps -v -e .
if [ "${STATUS[build]}" != ok ]; then
  grep -n -i -B2 -A8 "error" "$LOGS/build.log" | head -80 || tail -60 "$LOGS/build.log"
  exit 1
fi
"$PY" -c "import llama2_kernels as K; assert K.has_cuda(), 'llama2_C has no CUDA kernels'; \
print('llama2_C CUDA kernels registered')"

# compute-sanitizer: from the toolkit, PATH, or the nvidia-cuda-sanitizer-api wheel.
find_sanitizer() {
  local c
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "$(command -v compute-sanitizer || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
  done
  "$PY" - <<'PYEOF' 2>/dev/null || true
import glob, os
import nvidia.cuda_sanitizer_api as m
for p in glob.glob(os.path.join(os.path.dirname(m.__file__), "**", "compute-sanitizer"), recursive=True):
    if os.access(p, os.X_OK):
        print(p)
        break
PYEOF
}
SANITIZER=$(find_sanitizer)
SAN_STEPS=(memcheck racecheck synccheck initcheck)
if [ -n "$SANITIZER" ]; then
  echo "compute-sanitizer: $SANITIZER"
  # The four tools at once (separate processes; the GPU is shared, the CPU has cores to spare).
  sanitize() {
    local tool=$1 extra=()
    # (no --leak-check: PyTorch's caching allocator keeps its blocks until the process ends)
    [ "$tool" = racecheck ] && extra=(--racecheck-report all)
    run_step "sanitize_$tool" 80 "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 20 \
      ${extra[@]+"${extra[@]}"} "$PY" bench/sanitize_cases.py --device cuda
  }
  for tool in "${SAN_STEPS[@]}"; do
    sanitize "$tool" >"$LOGS/sanitize_$tool.status" &
  done
  wait
  for tool in "${SAN_STEPS[@]}"; do
    cat "$LOGS/sanitize_$tool.status"
    # run_step ran in a subshell: read its verdict back from what it printed
    line=$(grep "^== sanitize_$tool:" "$LOGS/sanitize_$tool.status" || echo "== sanitize_$tool: FAILED (no status) in 0s")
    STATUS[sanitize_$tool]=$(echo "$line" | sed -E 's/^== [^:]+: (.*) in [0-9]+s.*/\1/')
    SECONDS_TAKEN[sanitize_$tool]=$(echo "$line" | sed -E 's/.* in ([0-9]+)s.*/\1/')
    grep -E "ERROR SUMMARY|Error|error" "$LOGS/sanitize_$tool.log" | tail -5 || true
  done
else
  for tool in "${SAN_STEPS[@]}"; do
    STATUS[sanitize_$tool]="MISSING compute-sanitizer (CUDA toolkit or pip nvidia-cuda-sanitizer-api)"
    SECONDS_TAKEN[sanitize_$tool]=0
  done
  echo "== sanitize: no compute-sanitizer found"
fi

TESTS=(tests/test_kernels_cuda.py)
[ -f tests/test_kernels.py ] && TESTS+=(tests/test_kernels.py)
run_step tests 100 "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
tail -25 "$LOGS/tests.log"

if [ -f bench/bench_ops.py ]; then
  run_step bench 110 "$PY" bench/bench_ops.py --device cuda
  tail -40 "$LOGS/bench.log"
else
  STATUS[bench]="MISSING bench/bench_ops.py"
  SECONDS_TAKEN[bench]=0
fi

# Our own quick numbers, independent of bench_ops.py: attention fwd and fwd+bwd against PyTorch's
# scaled_dot_product_attention (flash backend) at a Llama-2-7B-like head shape, bf16.
run_step attn_timing 20 "$PY" - <<'PYEOF'
import torch, torch.nn.functional as F
import llama2_kernels as K
torch.manual_seed(0)
B, T, H, KV, D = 2, 2048, 32, 8, 128
q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(q)
def ours():
    return K.attention(q, k, v, causal=True)
def sdpa():
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)
def ms(fn, n=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]
flops_fwd = 4 * B * H * T * T * D / 2  # causal: half the scores
print(f"attention bf16 B={B} T={T} H={H} KV={KV} D={D} causal (median ms, TFLOP/s)")
for name, fn in (("llama2_C", ours), ("sdpa", sdpa)):
    with torch.no_grad():
        f = ms(fn)
    fb = ms(lambda: torch.autograd.grad(fn(), (q, k, v), g))
    print(f"{name:9s} fwd {f:7.3f} ms {flops_fwd / f / 1e9:6.1f} | fwd+bwd {fb:7.3f} ms "
          f"{3.5 * flops_fwd / fb / 1e9:6.1f}")
err = (ours().float() - sdpa().float()).abs().max().item()
print(f"max |llama2_C - sdpa| = {err:.3g}")
PYEOF
tail -5 "$LOGS/attn_timing.log"

echo
echo "==================== gpu_check summary ===================="
nvidia-smi --query-gpu=name --format=csv,noheader
printf "%-20s %-40s %6s\n" step status seconds
for s in build sanitize_memcheck sanitize_racecheck sanitize_synccheck sanitize_initcheck tests bench \
  attn_timing; do
  printf "%-20s %-40s %6s\n" "$s" "${STATUS[$s]:-not run}" "${SECONDS_TAKEN[$s]:-0}"
done
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$LOGS/tests.log" | tail -1 || true
echo "total $(($(date +%s) - T0))s"
for s in build sanitize_memcheck sanitize_racecheck sanitize_synccheck sanitize_initcheck tests bench; do
  [ "${STATUS[$s]:-}" = ok ] || exit 1
done
