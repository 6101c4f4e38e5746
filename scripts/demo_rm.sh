#!/usr/bin/env bash
# CPU demo of stage 3: preference pairs sampled from the stage-2 checkpoints (SFT and two GAtt
# models at temperatures 0.6 / 0.9 / 1.2) and labelled by the simulated annotators, the reward
# model trained on them and evaluated on held-out pairs (accuracy by rating against annotators and
# the noise-free judge, the ceiling, Spearman, calibration, PNG).
#
#   bash scripts/demo_rm.sh                  # the timed demo: pairs + training + evaluation
#   ABLATION=1 bash scripts/demo_rm.sh       # + margins none/small/large x 3 seeds, training-set size 1/4, 1/2
#
# Why the demo departs from SPEC.md §7: a 3M-parameter model and 1200 pairs, so a batch is 32
# pairs (the paper: 512) and the peak lr 5e-4 (the paper's 1e-5 barely moves a 3M model in 37
# steps; of 2e-4, 5e-4 and 1.5e-3, 5e-4 learned the most, 1.5e-3 learned nothing). Everything else
# is the recipe: one epoch, cosine to 10%, warmup 3% (at least 5 steps), AdamW 0.9/0.95/1e-5,
# weight decay 0.1, clipping 1.0. One CPU thread (THREADS=1): on a shared 2-core machine batched
# generation ran 4x faster with one thread than with two.
set -euo pipefail
cd "$(dirname "$0")/.."
SFT=${SFT:-out/demo_sft}
OUT=${OUT:-out/demo_rm}
COMMON="--checkpoint $SFT/sft --pair_models $SFT/sft,$SFT/gatt_none2,$SFT/gatt_judge2 --pairs_dir $OUT/pairs --log_every 10 --threads ${THREADS:-1}"
t() { date +%s; }
t0=$(t)
python train_rm.py $COMMON --margin small --seed 1 --out_dir "$OUT/rm_small_1"
t1=$(t)
echo "seconds: pairs + training + evaluation $((t1 - t0))"
if [ "${ABLATION:-0}" = 1 ]; then
  for margin in none small large; do
    for seed in 1 2 3; do
      [ "$margin$seed" = small1 ] && continue
      python train_rm.py $COMMON --margin $margin --seed $seed --out_dir "$OUT/rm_${margin}_$seed"
    done
  done
  for frac in 0.25 0.5; do
    python train_rm.py $COMMON --margin small --seed 1 --train_frac $frac --out_dir "$OUT/rm_frac${frac}"
  done
  python train_rm.py --report "$OUT/rm_*/eval.json" --out_dir "$OUT"
  echo "seconds: ablation $(( $(t) - t1 ))"
fi
