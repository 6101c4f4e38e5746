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
#
# Measured (2-core CPU, shared, OMP_NUM_THREADS=1, default flags: 128 prompts x k=8, T grid
# 0.6..1.5 on 16 prompts, 3 iterations): tuning + sampling + scoring + fine-tuning 244 s, with the
# four evaluations 412 s. With the demo RM (53.6% accuracy, near chance) the RM's picks are no
# better by the judge than a random sample (0.442 -> 0.430, 0.439 -> 0.440, 0.342 -> 0.344), and
# the policy learns the RM's errors: greedy RM score +0.456 (+-0.026) while the judged score
# falls 0.483 -> 0.434 (-0.049 +-0.012): the report prints OVER-OPTIMIZATION. The judge-picked
# ORACLE run (picks 0.45 -> 0.56 by the judge) holds the judged score (0.483 -> 0.478): with 128
# prompts the gold answers are little better than greedy, so even a perfect selector gains
# nothing measurable here.
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
