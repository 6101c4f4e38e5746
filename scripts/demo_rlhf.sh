#!/usr/bin/env bash
# CPU demo of stage 4a: iterative rejection sampling (train_rlhf.py --method rs) from the demo
# GAtt model with the demo reward model, three iterations V1..V3 with the default flags, each
# model evaluated on held-out prompts (judged score greedy and at the tuned temperature, RM score,
# win rate against V0, EOS, length, best-of-N curves for the RM and the judge, adherence by turn),
# then the report: the table per iteration with floors, Fig. 7 (best_of_n.png), Fig. 8
# (temperatures.png), iterations.png and the over-optimization line.
#
#   bash scripts/demo_rlhf.sh                      # needs scripts/demo_sft.sh and demo_rm.sh first
#   RM=out/demo_rm_default/rm bash scripts/demo_rlhf.sh   # another reward model
#   ORACLE=1 bash scripts/demo_rlhf.sh             # also the judge-selected ORACLE ablation
#
# On a busy shared machine OMP_NUM_THREADS=1 can be much faster than the default.
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY=${POLICY:-out/demo_sft/gatt_none2}
RM=${RM:-out/demo_rm/rm_small_1}
OUT=${OUT:-out/demo_rlhf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
t0=$(date +%s)
python train_rlhf.py --method rs --checkpoint "$POLICY" --reward_model "$RM" --out_dir "$OUT/rs"
t1=$(date +%s)
if [ "${ORACLE:-0}" = 1 ]; then
  python train_rlhf.py --method rs --select judge --checkpoint "$POLICY" --reward_model "$RM" \
    --out_dir "$OUT/rs_oracle"
fi
t2=$(date +%s)
grep -h "train_seconds" "$OUT/rs/metrics.jsonl" | tail -1
echo "seconds: RS run with evaluation $((t1 - t0)); oracle ablation $((t2 - t1)); report: $OUT/rs/report.txt"
