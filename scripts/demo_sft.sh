#!/usr/bin/env bash
# CPU demo of stage 2: pretrained checkpoint -> SFT -> Ghost Attention (two rounds, judge-picked
# replies as an oracle ablation and unfiltered replies), each model evaluated by the world's judge
# on held-out problems (score with its floor, pass@1 vs best-of-8, adherence by turn and per
# instruction with its floor, on instructions GAtt trains on and on unseen ones, PNG plot).
#
#   bash scripts/demo_sft.sh                 # expects the pretrained checkpoint below
#   PRETRAIN=1 bash scripts/demo_sft.sh      # pretrain it first (Shakespeare + the world's text)
#   EVAL=0 bash scripts/demo_sft.sh          # the training pipeline only (SFT + 2x2 GAtt rounds)
#
# On a busy shared machine OMP_NUM_THREADS=1 can be much faster than the default.
#
# Why the demo departs from SPEC.md §5: a 3M-parameter model and a few hundred steps, so the peak
# lr is 1.5e-3 (2e-5 would barely move it) with a short warmup, and a batch is 8 packed rows of
# 512 tokens instead of 64 rows of 4096. The world's levels 1-2 only: with levels 1-4 (first try,
# 600 dialogs) the 3M model collapsed to "The answer is 1." and obeyed 17% of instructions.
# Half of the SFT dialogs carry a standing instruction (the generator's default is 35%), still
# only in dialogs of 1-2 turns: with 35% the SFT model obeyed 62% of instructions at turn 1, with
# 50% about 90%, and GAtt cannot hold an instruction better than the model follows it at turn 1.
# Everything else (cosine to 10%, weight decay 0.1, AdamW 0.9/0.95, clip 1.0, 2 epochs, packing,
# answer-only loss) is the recipe. GAtt dialogs have 6-12 turns: with 2-12, the rollouts (the
# instruction in every user message) overflow the 512-token context around turn 8, few samples
# cover turns 9-12, and adherence fell there (88% at turn 1, 33% at turn 12). GAtt runs twice, as
# Llama 2 rebuilt its data with each newer model: the second round samples from the first round's
# model (different dialogs) and lifts the late turns (round one alone: 88-98% at turns 1-10).
set -euo pipefail
cd "$(dirname "$0")/.."
PT=${PT:-out/pretrain_chat}
OUT=${OUT:-out/demo_sft}
EVAL_ARGS="--eval_n 200 --eval_bestof_n 48 --eval_k 8 --eval_mt_n 96 --eval_turns 12 --eval_levels 1,2"
WORLD="--data world --world_n 3000 --world_p_instruction 0.5 --world_levels 1,2"
mkdir -p "$OUT"
t() { date +%s; }
evaluate() { if [ "${EVAL:-1}" = 1 ]; then python train_sft.py --eval $EVAL_ARGS "$@"; fi; }

if [ "${PRETRAIN:-0}" = 1 ]; then
  python world.py text --n 30000 --out out/data/world.txt
  python train_pretrain.py --data shakespeare,out/data/world.txt --model demo --max_seq_len 512 \
    --seq_len 512 --batch_size 8 --max_steps 400 --warmup_steps 40 --lr 2e-3 --eval_every 200 \
    --save_every 50 --samples 1 --out_dir "$PT"
fi

t0=$(t)
evaluate --checkpoint "$PT" --fewshot 3 --label pretrain-3shot --out_dir "$OUT/eval_pretrain"
t1=$(t)
python train_sft.py --checkpoint "$PT" $WORLD --epochs 2 --batch_size 8 --lr 1.5e-3 \
  --warmup_steps 5 --log_every 10 --out_dir "$OUT/sft"
t2=$(t)
evaluate --checkpoint "$OUT/sft" --label sft --out_dir "$OUT/eval_sft" \
  --plot_with "$OUT/eval_pretrain/eval.jsonl"
t3=$(t)
# Ghost Attention twice per selection rule: "judge" picks the best of 8 replies by the world's
# judge and drops replies that break the instruction (an ORACLE: the judge is also what evaluates,
# so this is an ablation, labelled as such; the reward model replaces it once it exists); "none"
# keeps the one sampled reply, unfiltered. Each round samples from the previous round's model.
for select in judge none; do
  prev="$OUT/sft"
  k=8; [ "$select" = none ] && k=1
  for round in 1 2; do
    python train_sft.py --gatt --gatt_select $select --gatt_k $k --checkpoint "$prev" --gatt_n 48 \
      --gatt_min_turns 6 --gatt_max_turns 12 --gatt_temperature 0.8 --gatt_mix 200 $WORLD \
      --epochs 3 --batch_size 8 --lr 1e-3 --warmup_steps 2 --log_every 10 --seed $round \
      --out_dir "$OUT/gatt_$select$round"
    prev="$OUT/gatt_$select$round"
  done
done
t4=$(t)
evaluate --checkpoint "$OUT/gatt_none2" --label "GAtt, no filter" --out_dir "$OUT/eval_gatt_none"
evaluate --checkpoint "$OUT/gatt_judge2" --label "GAtt, judge-picked (oracle)" \
  --out_dir "$OUT/eval_gatt_judge" --plot_with \
  "$OUT/eval_gatt_none/eval.jsonl,$OUT/eval_sft/eval.jsonl,$OUT/eval_pretrain/eval.jsonl"
t5=$(t)
printf 'Hello!\nWhat is 12 plus 7?\n' | python llama2.py --checkpoint "$OUT/gatt_judge2" --chat \
  --system "Always answer in capital letters." --temperature 0 --max-new-tokens 40
echo
echo "seconds: eval pretrained $((t1 - t0)), SFT $((t2 - t1)), eval SFT $((t3 - t2)), GAtt 2x2 rounds $((t4 - t3)), eval GAtt x2 $((t5 - t4))"
echo "training (SFT + GAtt): $((t2 - t1 + t4 - t3)) s; whole demo $((t5 - t0)) s; plot: $OUT/eval_gatt_judge/adherence.png"
