"""Stage 4 of the Llama 2 recipe, part 1: RLHF by iterative rejection sampling (paper §3.2.3,
SPEC.md §8 and §10); `--method ppo`: PPO with a KL penalty to the start policy (SPEC.md §9, the
"PPO" section below: rollout, score, advantages and update as plain functions).

Each iteration i = 1..n turns the latest model V(i-1) (V0 = the start: a chat model, SFT or GAtt)
into Vi:
  1. re-tune the temperature: on a slice of the training prompts, sample k replies at each T of
     a grid, score them with the reward model and keep the T with the highest expected max reward
     of k samples (the paper's Fig. 8: the best T drifts upward as training proceeds);
  2. evaluate V(i-1) on held-out prompts (evaluate.policy_eval: judged score greedy and at T, RM
     score, win rate against V0, EOS rate, length, best-of-N curves, adherence by turn);
  3. sample k replies to every training prompt at that T (batched, KV cache), score each with the
     reward model, and keep the best as the prompt's new gold answer. A reply that did not end
     with EOS is never picked (training on it would teach the model not to stop). From V3 on the
     gold answer is the best over the samples of ALL iterations so far (the paper's fix for V3's
     forgetting), `--pool false` uses this iteration's samples only;
  4. fine-tune V(i-1) on (prompt, gold answer) with SFT's answer-only loss and packing (sft_data.py).
After the last iteration, Vn is tuned and evaluated the same way. The reward model selects; the
world's judge only measures (`--select judge` is a labelled ORACLE ablation).

The prompts come from training-split problems (world.chat_prompts, "train": with and without a
standing instruction, 1..max_turns turns), the same set every iteration so that pooling compares
each prompt's samples across iterations. Evaluation uses held-out problems only.

Safety (§4.2, SPEC.md §12): --safety_share puts safety prompts (requests for a secret and
borderline prompts) among the training prompts, and --safety_rm adds the safety reward model; the
reward is then the paper's combination (CombinedReward: the safety RM's on safety prompts and
wherever it scores a reply below sigmoid 0.15, else the helpfulness RM's), for rejection sampling
and PPO alike. Every evaluation measures violations and false refusals on held-out safety prompts.
`--method distill` is safety context distillation (§4.2.4): one iteration of the same loop in which
the "samples" of each safety prompt are an answer generated with the safety preprompt
(world.SAFETY_PREPROMPT) and one without; the preprompted answer is kept (targeted: only where the
safety RM scores it higher) and the model is fine-tuned on it without the preprompt.

    # three iterations from the demo GAtt model with the demo reward model; every Vi's win rate
    # against V0 and (--compare) against the SFT model, on the same held-out prompts
    python train_rlhf.py --checkpoint out/pipeline/gatt2 \\
        --reward_model out/pipeline/rm --compare sft=out/pipeline/sft --out_dir out/rlhf_rs
    # safety RLHF: 10% safety prompts, the helpfulness and safety RMs combined (§3.2.2)
    python train_rlhf.py --safety_share 0.1 --safety_rm out/rm_safety --out_dir out/rlhf_safety
    # safety context distillation, targeted by the safety RM (§4.2.4)
    python train_rlhf.py --method distill --iterations 1 --safety_rm out/rm_safety --out_dir out/cd
    # the pooling ablation, and the judge as the selector (an ORACLE: it is also the evaluation)
    python train_rlhf.py --pool false --out_dir out/rlhf_rs_nopool
    python train_rlhf.py --select judge --out_dir out/rlhf_rs_oracle
    # distillation (§3.2.3): a larger model draws the samples, the RM picks, the demo model is
    # fine-tuned on its picks (pipeline.py --ablations: rs_distill)
    python train_rlhf.py --sampler out/pipeline/sft_large --out_dir out/rlhf_rs_distill
    # under torchrun: each rank samples and scores its share of the prompts, the samples are
    # gathered, the fine-tuning is DDP (the same picks as 1 process; weights within float error)
    torchrun --standalone --nproc_per_node=2 train_rlhf.py --device cpu --out_dir out/rlhf_rs2
    # stop mid-iteration, then continue exactly where it stopped
    python train_rlhf.py --stop_at 2:1 --out_dir out/rlhf_rs && python train_rlhf.py --resume \\
        --out_dir out/rlhf_rs
    # PPO from the last rejection-sampling model (writes ckpt.pt, stage "rlhf": the iteration of
    # the best validation score if it beats pi_0's by more than --keep_se paired standard errors
    # over the validation prompts, else pi_0; metrics.jsonl: a row per iteration, 0 = pi_0's
    # samples, with val_diff and val_se against pi_0;
    # ppo_overopt.png and ppo_report.{txt,json}: RM and judged score against sqrt KL;
    # eval_{start,final}.json: held-out evaluation, --compare adds the final model's win rate
    # against other models to eval_final.json under "compare")
    python train_rlhf.py --method ppo --checkpoint out/rlhf_rs/V3 --out_dir out/rlhf_ppo \\
        --beta 0.01 --compare sft=out/pipeline/sft,rs=out/rlhf_rs/V3
    # the over-optimization report of a beta sweep: runs overlaid in out/ppo_sweep/ppo_overopt.png
    python train_rlhf.py --method ppo --report out/ppo_sweep/beta0,out/ppo_sweep/beta0.01
    # PPO under torchrun: each rank rolls out its chunks of the batch and takes an equal share
    # of every mini-batch (DDP); the whitening and the statistics are reduced over the ranks
    torchrun --standalone --nproc_per_node=2 train_rlhf.py --method ppo --device cpu \\
        --checkpoint out/rlhf_rs/V3 --out_dir out/rlhf_ppo2
    # chat with the last model
    python llama2.py --checkpoint out/rlhf_rs/V3 --chat

The file reads in two contiguous parts, each top to bottom: rejection sampling (selection
helpers, then `run` and its four steps, then its report) and PPO (rollout, rewards, GAE,
update, health numbers, then `run_ppo`); after them the inputs both methods check, and main().

Writes in --out_dir: ckpt.pt (the run's state for --resume), V1..Vn/ckpt.pt (each iteration's
model, stage "rlhf"), iter<i>/{tune,eval}.json and samples.jsonl, metrics.jsonl (a line per
fine-tuning step and per evaluated model), best_of_n.png (Fig. 7), temperatures.png (Fig. 8),
iterations.png (judge, RM and win rate per iteration).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# OpenMP threads that busy-wait stall when other processes share the cores (see train_sft.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import evaluate
import llama2
import sampling
import sft_data
import training
import world

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    method: str = "rs"  # rs (rejection sampling) | ppo (PPO with a KL penalty to the start policy) | distill (safety context distillation, §4.2.4: answers generated with the safety preprompt, fine-tuned on without it)
    targeted: bool = True  # distill: keep a preprompted answer only where the safety RM (--safety_rm) scores it above the answer without the preprompt (§4.2.4); false = untargeted, keep them all
    # models
    checkpoint: str = "out/pipeline/sft"  # the start policy V0: a chat checkpoint (sft, gatt or rlhf; the pipeline starts from SFT)
    reward_model: str = "out/pipeline/rm"  # the reward model that picks the gold answers (train_rm.py)
    safety_rm: str = ""  # the safety reward model (train_rm.py --objective safety); given, the reward is the paper's combination of the two (CombinedReward, §3.2.2: the safety RM's on safety prompts and wherever it finds a reply unsafe, else the helpfulness RM's); "" = helpfulness only
    sampler: str = ""  # distillation (§3.2.3): a chat checkpoint, larger than the policy, that draws the k samples the RM picks from; the policy is fine-tuned on its picks (Llama 2 sampled only with its largest model); "" = the policy's own samples
    select: str = "rm"  # who picks the best sample: rm (the recipe) | judge (world's judge: an ORACLE ablation, it is also the evaluation)
    # rejection sampling (Llama 2 §3.2.3)
    iterations: int = 3  # RLHF versions V1..Vn (Llama 2: V1..V4 by rejection sampling, V5 by PPO on top)
    prompts: int = 128  # training prompts, the same set every iteration
    k: int = 8  # samples per prompt (Llama 2: not one K; Fig. 26 uses 20, Figs. 7-8 sweep N up to 100)
    pool: bool = True  # from iteration pool_from on, the gold answer is the best sample of all iterations so far (Llama 2: from V3)
    pool_from: int = 3  # first iteration that pools (Llama 2: V3)
    temperatures: str = "0.6,0.8,1.0,1.2,1.5"  # grid re-tuned every iteration (Llama 2 Fig. 8: best T 1.2-1.3 for the RLHF model)
    tune_prompts: int = 16  # training prompts the temperature is tuned on (the first ones of the set)
    top_p: float = 1.0  # nucleus sampling (1.0 = pure sampling, the temperature is the knob)
    eval_temperature: float = 0.6  # the "sampled" replies every evaluation judges: Meta's chat default (T 0.6, top-p 0.9), how a user meets the model; 0 = at the method's temperature (RS's tuned T, PPO's rollout T)
    eval_top_p: float = 0.9  # ... and their top-p
    prompt_levels: str = "1,2"  # difficulty levels of the training prompts
    p_instruction: float = 0.5  # share of training prompts with a standing instruction
    safety_share: float = 0.0  # share of the training prompts that are safety prompts (world.safety_prompts: requests for a secret, 80% adversarial, and borderline prompts; the paper's Fig. 15 sweeps 0-100%)
    max_turns: int = 3  # user turns per training prompt, at most (earlier ones answered by the careful human)
    max_new_tokens: int = 48  # longest sampled reply
    gen_batch: int = 64  # sequences per batched generate call
    # PPO (--method ppo; Llama 2 §3.2.3, SPEC.md §9). Demo scale: a 3M model on 2 CPU cores
    # cannot take 200-400 iterations of 512 rollouts at lr 1e-6 (hours, and such a small lr would
    # barely move it in the few dozen steps it can afford), so fewer, smaller batches and a larger
    # lr; the paper's values are in brackets
    ppo_iterations: int = 20  # PPO iterations, at most (Llama 2: 200-400, early stopping)
    ppo_prompts: int = 512  # training-split prompts the rollouts draw from
    ppo_batch: int = 64  # rollouts per iteration (Llama 2: 512)
    ppo_minibatch: int = 16  # rollouts per gradient step, one step per mini-batch (Llama 2: 64)
    ppo_lr: float = 1e-4  # policy lr, constant (Llama 2: 1e-6; measured on the demo: 1e-5 left approx-KL ~1e-5 and clipfrac 0, 1e-4 raised the validation score in 20 iterations)
    value_lr: float = 1e-4  # critic lr, constant (Llama 2: not given)
    beta: float = 0.01  # KL penalty to pi_0 per token (Llama 2: 0.01 for 7B/13B, 0.005 for 34B/70B)
    temperature: float = 1.0  # rollout temperature, pure sampling; the same T re-scores (top_p is 1)
    clip_ratio: float = 0.2  # PPO ratio clip (Llama 2: 0.2)
    clip_value: float = 0.2  # value clip (Huang et al. 2024: 0.2)
    gamma: float = 1.0  # GAE discount (Huang et al. 2024: 1)
    lam: float = 0.95  # GAE lambda (Huang et al. 2024: 0.95)
    no_eos_score: float = -1.0  # the score of a rollout with no EOS within max_new_tokens
    whiten_n: int = 64  # pi_0 samples that fix the RM score's whitening statistics
    val_prompts: int = 32  # validation-split prompts for early stopping (world.SPLITS: never in the rollouts nor in the test)
    val_every: int = 1  # validate every N iterations
    patience: int = 5  # stop after N validations without a better score (0: never)
    keep_se: float = 2.0  # the run's model is the best iteration by validation score only if it beats pi_0 by more than this many paired standard errors over the validation prompts, else pi_0 (0: the best one above pi_0)
    ppo_judge: bool = True  # log the judge's score of each batch's rollouts (measured only, never trained on)
    compare: str = ""  # name=checkpoint,... win rates against other models on the held-out prompts: rs, of every Vi (eval.json "win_rate_vs", e.g. sft=out/pipeline/sft); ppo, of the final model (eval_final.json "compare", e.g. sft=...,rs=out/pipeline/rs/V3)
    report: str = ""  # ppo: run_dir,run_dir,... of finished PPO runs (e.g. a --beta sweep): ppo_overopt.png and the table, no training
    # fine-tuning on the gold answers (SFT's answer-only loss and packing, sft_data.py; Llama 2 SFT values in brackets)
    epochs: float = 2.0  # passes over the gold answers per iteration (SFT: 2)
    batch_size: int = 8  # packed rows per optimizer step (SFT: 64 rows of 4096)
    micro_batch: int = 1  # rows per forward pass
    seq_len: int = 0  # tokens per packed row (0 = the model's context)
    lr: float = 1e-4  # peak lr, cosine to min_lr_ratio over the iteration (SFT: 2e-5; chosen on the validation split, crowd world: 5e-4 -0.017, 1e-4 +0.020, 2e-5 +0.012 judged over SFT)
    warmup_steps: int = 1  # linear warmup steps of each iteration
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak lr
    weight_decay: float = 0.1  # AdamW weight decay (Llama 2: 0.1)
    beta1: float = 0.9  # AdamW beta1 (Llama 2: 0.9)
    beta2: float = 0.95  # AdamW beta2 (Llama 2: 0.95)
    eps: float = 1e-5  # AdamW epsilon (Llama 2: 1e-5)
    grad_clip: float = 1.0  # global gradient-norm clipping (Llama 2: 1.0)
    # evaluation, held-out prompts only
    eval: bool = True  # evaluate V0..Vn (false: only train; the temperature is still tuned)
    eval_n: int = 200  # held-out prompts: one greedy and one sampled reply each (judge, RM, win rate)
    eval_bestof_n: int = 32  # held-out prompts for the best-of-N curves (Fig. 7)
    eval_k: int = 16  # samples per prompt for the best-of-N curves (M >= N = 1..eval_k)
    eval_mt_n: int = 16  # 12-turn dialogs for adherence by turn
    eval_turns: int = 12  # user turns per adherence dialog
    eval_levels: str = "1,2"  # difficulty levels of the held-out prompts
    eval_split: str = "heldout"  # where evaluation prompts come from: heldout (the test split, for the report) or valid (the validation split, to choose hyperparameters on)
    eval_safety_n: int = 200  # safety prompts of the evaluation split: violation and false-refusal rates of every model (0 = none)
    # logging and checkpoints
    out_dir: str = "out/rlhf_rs"  # ckpt.pt, V1..Vn/, iter<i>/, metrics.jsonl, PNGs
    log_every: int = 1  # print a step line every N fine-tuning steps
    stop_at: str = ""  # stop (and save) at "i:s": iteration i after s fine-tuning steps (0 = right after sampling), e.g. to test --resume; ppo: "i:0" stops after PPO iteration i
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast: auto (bfloat16 on a GPU or a CPU with AMX-BF16 or AVX512-BF16, else float32), float32, bfloat16
    seed: int = 1337  # seeds prompts, sampling and data order


# the flags a --resume must share with the run it continues (the others: logging, --eval, --stop_at;
# --iterations may grow)
RESUME_SAME = ("method", "targeted", "checkpoint", "reward_model", "safety_rm", "safety_share", "sampler",
               "select", "prompts", "k", "pool",
               "pool_from", "temperatures", "tune_prompts", "top_p", "prompt_levels",
               "p_instruction", "max_turns", "max_new_tokens", "gen_batch", "epochs", "batch_size",
               "micro_batch", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
               "beta1", "beta2", "eps", "grad_clip", "seed")
PPO_RESUME_SAME = ("method", "checkpoint", "reward_model", "prompt_levels", "p_instruction",
                   "max_turns", "max_new_tokens", "gen_batch", "weight_decay", "beta1", "beta2",
                   "eps", "grad_clip", "seed", "ppo_prompts", "ppo_batch", "ppo_minibatch",
                   "ppo_lr", "value_lr", "beta", "temperature", "clip_ratio", "clip_value",
                   "gamma", "lam", "no_eos_score", "whiten_n", "val_prompts", "val_every",
                   "patience", "keep_se")
PPO_STAGE = "rlhf_ppo"  # the stage of a PPO run's ckpt.pt while it trains ("rlhf" when done)
STAGE = "rlhf_rs"  # the stage of ckpt.pt (the run's state); each Vi is saved as stage "rlhf"
CHAT_STAGES = ("sft", "gatt", "rlhf")


def parse_stop_at(text: str) -> tuple[int, int] | None:
    """--stop_at "i:s" -> (i, s), or None."""
    if not text:
        return None
    try:
        i, s = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"error: --stop_at {text!r}: give iteration:steps, e.g. 2:0 (right after "
                         "iteration 2's sampling) or 2:3") from None
    return i, s


# -----------------------------------------------------------------------------------------------
# rejection sampling: rollout, scoring, selection, pooling


class CombinedReward:
    """The paper's final training reward from two reward models (§3.2.2, SPEC.md §12):

        R_c = R_s  if IS_SAFETY(prompt) or sigmoid(R_s) < 0.15  else  R_h

    on the RMs' raw head outputs (the paper's LOGIT of its sigmoid scores is the raw output, so
    WHITEN(LOGIT(R_c)) is a whitening of what this returns). IS_SAFETY is the prompt's label: it
    came from the safety prompts (world.prompt_kind: a request for a secret or a borderline
    prompt), known when the prompt is collected, as the paper's prompts were tagged; the judge is
    never asked. Scores like a reward model (`score`), so selection and evaluation take it as one."""

    def __init__(self, helpful, safety, threshold: float = training.SAFETY_THRESHOLD):
        self.helpful, self.safety, self.threshold = helpful, safety, threshold
        self.tokenizer = helpful.tokenizer

    @property
    def args(self):
        """The shape whose context bounds what both can read (the shorter one)."""
        return min(self.helpful.args, self.safety.args, key=lambda a: a.max_seq_len)

    def combine(self, r_h: torch.Tensor, r_s: torch.Tensor, is_safety) -> torch.Tensor:
        """The rule, on (N,) rewards of the two RMs and the prompts' IS_SAFETY labels."""
        use_s = torch.as_tensor(is_safety, dtype=torch.bool) | (torch.sigmoid(r_s) < self.threshold)
        return torch.where(use_s, r_s, r_h)

    def score(self, dialogs, responses, tokenizer=None, batch_tokens=None) -> torch.Tensor:
        return self.combine(self.helpful.score(dialogs, responses),
                            self.safety.score(dialogs, responses), is_safety(dialogs))

    def eval(self):
        self.helpful.eval(), self.safety.eval()
        return self

    def requires_grad_(self, flag: bool = True):
        self.helpful.requires_grad_(flag), self.safety.requires_grad_(flag)
        return self


def is_safety(dialogs) -> list[bool]:
    """IS_SAFETY of each prompt: it is one of the safety prompts (world.prompt_kind: a request for
    a secret or a borderline prompt), the label the prompt was collected with."""
    return [world.prompt_kind(d) != "ordinary" for d in dialogs]


def reward_model(cfg, tokenizer, rt):
    """The reward that selects and scores: the helpfulness RM, or with --safety_rm the paper's
    combination of it with the safety RM (CombinedReward)."""
    rm = training.load_reward_model(cfg.reward_model, "--reward_model", tokenizer, cfg.checkpoint,
                                    rt)
    if not cfg.safety_rm:
        return rm
    return CombinedReward(rm, training.load_reward_model(cfg.safety_rm, "--safety_rm", tokenizer,
                                                         cfg.checkpoint, rt))


def training_prompts(cfg, n: int | None = None, split: str = "train",
                     seed: int | None = None) -> list[list[dict]]:
    """The fixed set of n (default --prompts) prompts of `split`: chat prompts, and (a share
    --safety_share of them) safety prompts, spread through the set."""
    if not 0 <= cfg.safety_share <= 1:
        raise SystemExit(f"error: --safety_share {cfg.safety_share}: give a share in [0, 1]")
    n = cfg.prompts if n is None else n
    seed = cfg.seed if seed is None else seed
    levels = world.parse_levels(cfg.prompt_levels)
    # context distillation is for safety prompts only (§4.2.4)
    n_safety = n if cfg.method == "distill" else round(n * cfg.safety_share)
    prompts = world.chat_prompts(n - n_safety, split, seed, levels, cfg.p_instruction,
                                 cfg.max_turns)
    if n_safety:
        prompts += world.safety_prompts(n_safety, split, seed, levels=levels)
        random.Random(f"safety-mix-{seed}").shuffle(prompts)
    return prompts


def sample_k(model, tokenizer, prompts, cfg, temperature: float, seed: int, rt, desc: str):
    """k replies per prompt at `temperature` (batched with the KV cache): [[Reply] * k or None]."""
    return sampling.generate_replies(model, tokenizer, prompts, n=cfg.k, temperature=temperature,
                                     top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed,
                                     batch=cfg.gen_batch, rt=rt, desc=desc)


def sample_and_score(model, tokenizer, rm, prompts, cfg, temperature: float, seed: int, rt,
                     desc: str):
    """k samples per prompt and their selecting rewards, sharded over the ranks.

    The prompts are cut into fixed groups of gen_batch // k (one generate batch each), group g
    sampled with seed + g; the groups are dealt round robin to the ranks, each rank samples and
    scores its own, and the results are gathered back in prompt order. The samples depend only on
    the group, never on the number of processes, so 2 processes select what 1 process selects.
    """
    size = max(1, cfg.gen_batch // cfg.k)
    starts = list(range(0, len(prompts), size))
    mine = {}
    for g in range(rt.rank, len(starts), rt.world_size):
        group = prompts[starts[g]:starts[g] + size]
        samples = sample_k(model, tokenizer, group, cfg, temperature, seed + 1000 * g, rt,
                           f"{desc} {g + 1}/{len(starts)}")
        mine[g] = (samples, score_samples(group, samples, cfg.select, rm))
    if rt.distributed:  # every rank gets every group (replies are small Python objects)
        parts = [None] * rt.world_size
        torch.distributed.all_gather_object(parts, mine)
        mine = {g: v for part in parts for g, v in part.items()}
    samples = [r for g in range(len(starts)) for r in mine[g][0]]
    rewards = [r for g in range(len(starts)) for r in mine[g][1]]
    return samples, rewards


def score_samples(prompts, samples, select: str, rm) -> list[list[float] | None]:
    """The reward of each sample that SELECTS: the reward model's by default; the judge's only for
    the --select judge oracle ablation. samples: [[Reply] * k or None] per prompt."""
    pairs = [(i, d, r) for i, (d, rs) in enumerate(zip(prompts, samples)) if rs for r in rs]
    if select == "rm":
        try:
            flat = evaluate.rm_rewards(rm, [d for _, d, _ in pairs], [r.text for _, _, r in pairs])
        except ValueError as e:  # e.g. a prompt and its reply longer than the RM's context
            raise SystemExit(f"error: the reward model cannot score a sample: {e}; lower "
                             "--max_turns or --max_new_tokens") from None
    elif select == "judge":  # ORACLE ablation: the evaluation's own gold standard picks
        flat = evaluate.judge_scores([d for _, d, _ in pairs], [r for _, _, r in pairs])
    else:
        raise ValueError(f"select must be rm or judge, got {select!r}")
    out: list[list[float] | None] = [None if not rs else [] for rs in samples]
    for (i, _, _), x in zip(pairs, flat):
        out[i].append(x)
    return out


def choose_best(samples, rewards) -> list[int | None]:
    """Per prompt, the index of the sample with the highest reward among those that ended with
    EOS (no EOS -> never the gold answer); None when no sample qualifies. Ties: the first."""
    best = []
    for rs, rw in zip(samples, rewards):
        ok = [j for j in range(len(rs or [])) if rs[j].eos]
        best.append(max(ok, key=lambda j: (rw[j], -j)) if ok else None)
    return best


def pool_gold(per_iteration: list[list[dict | None]]) -> list[dict | None]:
    """The gold answer per prompt over several iterations: the candidate with the highest reward
    (the reward model is fixed, so rewards compare across iterations); ties: the earliest.
    per_iteration[t][p] = {"text", "reward", "iteration"} or None."""
    gold = []
    for cands in zip(*per_iteration):
        ok = [c for c in cands if c is not None]
        gold.append(max(ok, key=lambda c: (c["reward"], -c["iteration"])) if ok else None)
    return gold


def write_samples(path: Path, prompts, samples, rewards, best, judged, temperature,
                  greedy=None) -> None:
    """One JSON line per prompt: its k samples, their rewards and judged scores, the pick, and
    (given `greedy`: [[Reply] or None] per prompt) the policy's greedy reply."""
    with training.atomic_write(path, "w") as f:
        for p, (d, rs) in enumerate(zip(prompts, samples)):
            row = {"prompt": p, "messages": d, "temperature": temperature,
                   "responses": [r.text for r in rs or []], "eos": [r.eos for r in rs or []],
                   "n_tokens": [r.n_tokens for r in rs or []], "rewards": rewards[p],
                   "judged": judged[p], "best": best[p]}
            if greedy is not None and greedy[p]:
                row["greedy"] = greedy[p][0].text
            f.write(json.dumps(row) + "\n")


def read_samples(path: Path) -> list[dict]:
    return training.read_jsonl(path, lambda obj, where: obj,
                               missing="the run stopped before sampling; rerun without --resume")


def candidates(rows: list[dict], iteration: int) -> list[dict | None]:
    """Each prompt's picked sample of one iteration as a pooling candidate."""
    return [None if r["best"] is None else
            {"text": r["responses"][r["best"]], "reward": r["rewards"][r["best"]],
             "iteration": iteration} for r in rows]


# -----------------------------------------------------------------------------------------------
# temperature re-tuning (Fig. 8)


def tune_temperature(model, tokenizer, rm, prompts, cfg, iteration: int, rt) -> dict:
    """Expected max reward of N = 1..k samples for each T of the grid, on the tuning slice; the
    chosen T maximizes it at N = k. Uses the selecting reward (the RM unless --select judge)."""
    grid = [float(t) for t in cfg.temperatures.split(",") if t]
    curves = {}
    for t in grid:
        _, rewards = sample_and_score(model, tokenizer, rm, prompts, cfg, t,
                                      cfg.seed * 1009 + 97 * iteration, rt,
                                      f"tune V{iteration - 1} T={t:g}")
        curves[f"{t:g}"] = evaluate.best_of_n_curve([r for r in rewards if r])
    best = max(grid, key=lambda t: curves[f"{t:g}"]["max"][-1])  # ties: the lowest T
    return {"iteration": iteration, "temperature": best, "curves": curves,
            "prompts": len(prompts), "select": cfg.select}


# -----------------------------------------------------------------------------------------------
# fine-tuning on the gold answers: SFT's answer-only loss and packing (sft_data.py)


def gold_examples(tokenizer, prompts, gold, seq_len: int, seed: int):
    """(prompt + gold answer) examples, answer-only loss (sft_data.encode_example "last": the
    earlier turns, written by the careful human, are context), dropped if too long, shuffled."""
    examples = [sft_data.encode_example(tokenizer,
                                        d + [{"role": "assistant", "content": g["text"]}],
                                        "last", f"prompt {p}")
                for p, (d, g) in enumerate(zip(prompts, gold)) if g is not None]
    examples, dropped = sft_data.fit_examples(examples, seq_len)
    random.Random(seed).shuffle(examples)
    return examples, dropped


# -----------------------------------------------------------------------------------------------
# rejection sampling, the iterations: run, then its four steps in order (retune, evaluate_iteration,
# select_gold, fine_tune), then the report


def run(cfg: Config, rt, stop_at) -> None:
    """Rejection sampling, iterations 1..n (main() sets up and tears down the process group)."""
    training.rows_per_rank(cfg.batch_size, cfg.micro_batch, rt)  # refuses sizes that do not divide
    compare = compared_checkpoints(cfg)  # a missing one is refused before the sampling
    out_dir = Path(cfg.out_dir)
    resumed = training.load_resume(out_dir / "ckpt.pt", STAGE) if cfg.resume else None
    # ---- models: the policy (V0, or the resumed state) and the fixed reward model
    model, tokenizer, start_stage = load_policy(cfg, rt)
    rm = reward_model(cfg, tokenizer, rt)
    # who draws the k samples: the policy itself, or (--sampler, distillation) a larger model
    sampler = load_compare(cfg.sampler, tokenizer, rt, "--sampler") if cfg.sampler else model
    seq_len = training.context_length(cfg.seq_len, model.args.max_seq_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    # fine-tuning steps are numbered across iterations ("step"), so a resume trims the log there
    log = training.open_metrics(out_dir, resumed["global_step"] if resumed else 0, rt)
    # the module that trains: DDP under torchrun (sampling and saving use the plain model)
    ddp_model = training.wrap_model(model, rt, "ddp")
    # ---- the training prompts: one fixed set, training-split problems only
    prompts = training_prompts(cfg)
    # where the run stands: iteration `it` is in progress with `it_step` steps done
    pos = rs_resume(model, resumed, prompts, cfg, log)
    del resumed
    log.print(f"rejection sampling: V0 = {cfg.checkpoint} ({start_stage}, "
              f"{model.num_params() / 1e6:.2f}M parameters), reward model {cfg.reward_model}, "
              + (f"combined with the safety RM {cfg.safety_rm} (§3.2.2), " if cfg.safety_rm else "")
              + (f"{cfg.safety_share:.0%} safety prompts, " if cfg.safety_share else "")
              + (f"samples drawn by {cfg.sampler} ({sampler.num_params() / 1e6:.2f}M parameters: "
                 "distillation), " if cfg.sampler else "") +
              f"select by {'the RM' if cfg.select == 'rm' else 'the JUDGE (oracle ablation)'}; "
              f"{cfg.prompts} training prompts x k={cfg.k}, {cfg.iterations} iterations; "
              f"{rt.device} x {rt.world_size} process(es), kernels {llama2.kernels_in_use()}")
    t_train = 0.0  # seconds spent tuning, sampling, scoring and fine-tuning (not evaluating)
    evals = {"reference": None, "others": {}}  # V0's evaluation; --compare's models, scored
    for i in range(pos["it"], cfg.iterations + 2):
        # iteration i starts from V(i-1); "iteration" n+1 only tunes and evaluates Vn
        t0 = time.perf_counter()
        T = retune(i, sampler, tokenizer, rm, prompts[:cfg.tune_prompts], cfg, rt, log)
        t_train += time.perf_counter() - t0 if i <= cfg.iterations else 0.0
        if cfg.eval and rt.is_master:  # rank 0 evaluates, the others wait at the barrier
            evaluate_iteration(i, T, model, tokenizer, rm, compare, evals, cfg, rt, log)
        training.barrier(rt)
        if i > cfg.iterations:
            break
        t0 = time.perf_counter()
        # ---- rejection sampling: k samples per prompt at T, the RM picks the best
        gold = select_gold(i, T, model, sampler, tokenizer, rm, prompts, pos["global_step"], cfg,
                           rt, log)
        if stop_at == (i, 0):
            log.print(f"stopped after iteration {i}'s sampling (--stop_at {cfg.stop_at})")
            return
        # ---- fine-tune V(i-1) on the gold answers -> Vi
        if not fine_tune(i, model, ddp_model, tokenizer, prompts, gold, seq_len, pos, cfg, rt,
                         log, stop_at):
            return
        t_train += time.perf_counter() - t0
        log.print(f"V{i}: saved {out_dir / f'V{i}'}")
    log.write({"train_seconds": t_train},
              f"done: {cfg.iterations} iterations; tuning + sampling + scoring + fine-tuning "
              f"{t_train:.0f}s in this process (evaluation not counted)")
    if cfg.eval and rt.is_master:
        report(out_dir, cfg, log)


def rs_resume(model, resumed, prompts, cfg: Config, log) -> dict:
    """Where the run stands: {"it": the iteration in progress, "it_step": its fine-tuning steps
    done, "global_step": steps over all iterations, "optimizer": its state mid-iteration}. A
    resumed run must make the samples and the steps the stopped one would have made."""
    pos = {"it": 1, "it_step": 0, "global_step": 0, "optimizer": None}
    if not resumed:
        return pos
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    training.check_same_model_args(resumed["model_args"], asdict(model.args), str(ckpt_path))
    differ = [f"--{k}" for k in RESUME_SAME if resumed["config"].get(k) != getattr(cfg, k)]
    if differ or resumed["prompts_key"] != _key(prompts):
        what = ", ".join(differ) or "the prompts"
        raise SystemExit(f"error: cannot resume from {ckpt_path}: {what} differ from the run "
                         "that wrote it; use the same flags")
    model.load_state_dict(resumed["model"])
    pos.update(it=resumed["iteration"], it_step=resumed["it_step"],
               global_step=resumed["global_step"], optimizer=resumed.get("optimizer"))
    training.set_rng_state(resumed["rng"])
    log.print(f"resumed from {ckpt_path}: iteration {pos['it']}, {pos['it_step']} fine-tuning "
              "steps done")
    return pos


def save_rs(model, tokenizer, prompts, cfg: Config, rt, iteration: int, step: int,
            global_step: int, optimizer=None) -> None:
    """The run's state (<out_dir>/ckpt.pt, stage rlhf_rs): what --resume continues from."""
    if not rt.is_master:
        return
    training.save_checkpoint(Path(cfg.out_dir) / "ckpt.pt", {
        "model_args": asdict(model.args),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "config": asdict(cfg), "stage": STAGE, "parent": cfg.checkpoint,
        "iteration": iteration, "it_step": step, "global_step": global_step,
        "prompts_key": _key(prompts), "rng": training.rng_state()})


def cached(path: Path, make, cfg: Config, rt):
    """A JSON file of this run read back on --resume (what made it is deterministic), else made
    and written atomically."""
    if cfg.resume and path.is_file():
        return json.loads(path.read_text())
    obj = make()
    if rt.is_master:
        with training.atomic_write(path, "w") as f:
            f.write(json.dumps(obj))
    return obj


def untuned_temperature(cfg: Config) -> float:
    """Context distillation's T: the grid's first, never tuned (one answer per prompt)."""
    return float(cfg.temperatures.split(",")[0])


def retune(i: int, model, tokenizer, rm, tune_set, cfg: Config, rt, log) -> float:
    """Step 1 of iteration i: re-tune the temperature of V(i-1) (Fig. 8), logged. -> T.
    Context distillation samples one answer per prompt at the grid's first T, untuned."""
    if cfg.method == "distill":
        return untuned_temperature(cfg)
    tune = cached(Path(cfg.out_dir) / f"iter{i}" / "tune.json",
                  lambda: tune_temperature(model, tokenizer, rm, tune_set, cfg, i, rt), cfg, rt)
    T = tune["temperature"]
    sweep = " ".join(f"T={t}: {c['max'][-1]:+.3f}" for t, c in tune["curves"].items())
    log.write({"iteration": i - 1, "tune": {t: c["max"][-1] for t, c in tune["curves"].items()},
               "temperature": T},
              f"V{i - 1}: temperature re-tuned on {tune['prompts']} training prompts, E[max "
              f"of {cfg.k}] reward by T: {sweep} -> T={T:g}")
    return T


def evaluate_iteration(i: int, T: float, model, tokenizer, rm, compare: dict, evals: dict,
                       cfg: Config, rt, log) -> None:
    """Step 2: evaluate V(i-1) on held-out prompts (rank 0), its win rate against V0
    (evals["reference"]) and against each --compare model (evals["others"], measured once)."""
    out_dir = Path(cfg.out_dir)
    if evals["reference"] is None and i > 1:
        evals["reference"] = json.loads((out_dir / "iter1" / "eval.json").read_text())
    # --compare: each other model's replies to the same held-out prompts, measured once
    # (greedy, and sampled at V0's tuned T), then every Vi's win rate against them
    others = evals["others"]
    for name, path in compare.items():
        if name not in others:
            others[name] = cached(out_dir / f"compare_{name}.json", lambda: {
                "checkpoint": path, **evaluate.one_sample_stats(
                    load_compare(path, tokenizer, rt), tokenizer, rm, cfg, T, rt, name)}, cfg, rt)

    def measure():
        e = evaluate.policy_eval(model, tokenizer, rm, cfg, T, evals["reference"], rt,
                                 label=f"V{i - 1}")
        e["win_rate_vs"] = {n: {k: evaluate.win_rate(e[k]["judge_scores"], o[k]["judge_scores"])
                                for k in ("greedy", "sampled")}
                            for n, o in others.items()}
        return e
    ev = cached(out_dir / f"iter{i}" / "eval.json", measure, cfg, rt)
    if i == 1:
        evals["reference"] = ev
    log.write({"iteration": i - 1, "eval": _light(ev)}, evaluate.format_policy_eval(ev)
              + "".join(f"\n  win rate against {n} (judged, one sample each, ties half; "
                        f"floor/chance 50%): greedy {w['greedy']:.1%}, sampled "
                        f"{w['sampled']:.1%}" for n, w in ev.get("win_rate_vs", {}).items()))


def distill_samples(i: int, T: float, model, tokenizer, rm, prompts, cfg: Config, rt):
    """Context distillation's data (§4.2.4), in place of rejection sampling's k samples: for each
    safety prompt one answer generated with the safety preprompt (world.with_safety_preprompt)
    and one without, at T; both scored by the safety RM (or, untargeted without one, the RM) on
    the prompt WITHOUT the preprompt, what the model is fine-tuned on. The preprompted answer
    (index 0) is kept where it ended with EOS and, --targeted, scores above the plain one.
    -> (samples [[with, without] or None per prompt], rewards, best)."""
    seed = cfg.seed * 7919 + i

    def gen(dialogs, s, desc):
        return sampling.generate_replies(model, tokenizer, dialogs, temperature=T, top_p=cfg.top_p,
                                         max_new_tokens=cfg.max_new_tokens, seed=s,
                                         batch=cfg.gen_batch, rt=rt, desc=desc)
    pre = gen([world.with_safety_preprompt(d) for d in prompts], seed, f"V{i} with the preprompt")
    plain = gen(prompts, seed + 1, f"V{i} without it")
    samples = [[a[0], b[0]] if a and b else None for a, b in zip(pre, plain)]
    rewards = score_samples(prompts, samples, "rm", getattr(rm, "safety", rm))
    best = [0 if s and s[0].eos and (not cfg.targeted or r[0] > r[1]) else None
            for s, r in zip(samples, rewards)]
    return samples, rewards, best


def select_gold(i: int, T: float, model, sampler, tokenizer, rm, prompts, global_step: int,
                cfg: Config, rt, log) -> list[dict | None]:
    """Step 3: k samples per training prompt at T (drawn by the sampler: the policy `model`, or
    with --sampler a larger model), scored by the RM (the judge only measures),
    the best with EOS picked; the gold answers are this iteration's picks, or from --pool_from on
    the best over all iterations so far (pooling). Writes iter<i>/samples.jsonl and gold.jsonl."""
    out_dir = Path(cfg.out_dir)
    d = out_dir / f"iter{i}"
    samples_path = d / "samples.jsonl"
    if cfg.resume and samples_path.is_file():
        rows = read_samples(samples_path)
        log.print(f"V{i}: samples read back from {samples_path}")
    elif cfg.method == "distill":
        samples, rewards, best = distill_samples(i, T, sampler, tokenizer, rm, prompts, cfg, rt)
    else:
        samples, rewards = sample_and_score(sampler, tokenizer, rm, prompts, cfg, T,
                                            cfg.seed * 7919 + i, rt, f"V{i} sampling")
        best = choose_best(samples, rewards)
    if not (cfg.resume and samples_path.is_file()):
        # measured only, never used to pick: what the judge thinks of the samples, and the
        # policy's own greedy reply to each prompt (what the pick must beat, SPEC.md section 11)
        judged = [evaluate.judge_scores(dd, rs) if rs else None
                  for dd, rs in zip(([p] * cfg.k for p in prompts), samples)]
        if rt.is_master:
            greedy = sampling.generate_replies(model, tokenizer, prompts,
                                               max_new_tokens=cfg.max_new_tokens,
                                               batch=cfg.gen_batch, rt=rt, desc=f"V{i} greedy")
            write_samples(samples_path, prompts, samples, rewards, best, judged, T, greedy)
        save_rs(model, tokenizer, prompts, cfg, rt, i, 0, global_step)  # a resume re-reads them
        training.barrier(rt)
        rows = read_samples(samples_path)
    # the gold answers: this iteration's picks, or the best over all iterations (pooling)
    pooled = cfg.pool and i >= cfg.pool_from
    per_it = ([candidates(read_samples(out_dir / f"iter{j}" / "samples.jsonl"), j)
               for j in range(1, i)] if pooled else []) + [candidates(rows, i)]
    gold = pool_gold(per_it)
    if rt.is_master:
        with training.atomic_write(d / "gold.jsonl", "w") as f:  # what Vi is fine-tuned on
            f.writelines(json.dumps({"prompt": p, **(g or {"text": None})}) + "\n"
                         for p, g in enumerate(gold))
    _log_selection(log, i, rows, gold, pooled, cfg)
    return gold


def fine_tune(i: int, model, ddp_model, tokenizer, prompts, gold, seq_len: int, pos: dict,
              cfg: Config, rt, log, stop_at) -> bool:
    """Step 4: fine-tune V(i-1) on (prompt, gold answer) -> Vi, saved as V<i>/ckpt.pt (stage
    "rlhf"); pos (rs_resume's) moves on. -> False when --stop_at stopped it mid-way."""
    examples, dropped = gold_examples(tokenizer, prompts, gold, seq_len, cfg.seed + i)
    if not examples:
        raise SystemExit(f"error: iteration {i}: no gold answer (no sample ended with EOS); "
                         "raise --max_new_tokens or check the policy with train_sft.py --eval")
    rows = sft_data.pack_rows([len(e) for e in examples], seq_len)
    sampler = sft_data.RowSampler(len(rows), cfg.seed * 31 + i)
    n_steps = max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    optimizer = training.optimizer_for(model, cfg, rt)
    if pos["optimizer"] is not None and pos["it_step"] > 0 and i == pos["it"]:
        optimizer.load_state_dict(pos["optimizer"])
    start = pos["it_step"] if i == pos["it"] else 0
    pos["optimizer"] = None
    log.print(f"V{i}: fine-tuning on {len(examples)} gold answers ({len(dropped)} too long), "
              f"{len(rows)} packed rows, {n_steps} steps of {cfg.batch_size} rows")
    model.train()
    for step in range(start, n_steps):
        t1 = time.perf_counter()
        lr = training.cosine_lr(step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                total_steps=n_steps, min_lr_ratio=cfg.min_lr_ratio)
        training.set_lr(optimizer, lr)
        step_rows = [rows[sampler.row(step * cfg.batch_size + r)] for r in range(cfg.batch_size)]
        loss, tokens, gnorm, _ = sft_data.train_step(ddp_model, optimizer, examples, step_rows,
                                                     cfg.micro_batch, cfg.grad_clip, True, rt)
        if not math.isfinite(loss):
            raise SystemExit(f"error: the loss became {loss} at iteration {i} step {step + 1}; "
                             "lower --lr")
        pos["global_step"] += 1
        dt = time.perf_counter() - t1
        line = f"V{i} " + training.step_line(step + 1, n_steps, loss, lr, gnorm, dt, tokens / dt)
        log.write({"step": pos["global_step"], "iteration": i, "it_step": step + 1, "loss": loss,
                   "lr": lr, "gnorm": gnorm, "ms": dt * 1000, "tok_s": tokens / dt},
                  line if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps else None)
        if stop_at == (i, step + 1) and step + 1 < n_steps:
            save_rs(model, tokenizer, prompts, cfg, rt, i, step + 1, pos["global_step"], optimizer)
            log.print(f"stopped at iteration {i} step {step + 1} (--stop_at {cfg.stop_at})")
            return False
    model.eval()
    # Vi: a chat checkpoint of its own (stage "rlhf"), then the run's state moves past it
    if rt.is_master:
        training.save_checkpoint(Path(cfg.out_dir) / f"V{i}" / "ckpt.pt", {
            "model_args": asdict(model.args),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
            "config": asdict(cfg), "stage": "rlhf", "parent": cfg.checkpoint,
            "iteration": i})
    save_rs(model, tokenizer, prompts, cfg, rt, i + 1, 0, pos["global_step"])
    training.barrier(rt)
    return True


def _key(prompts) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def _log_selection(log, i, rows, gold, pooled, cfg) -> None:
    """One line of health numbers for the selection: the picked samples' reward and judged score
    against a random sample's (the judge is only read here, after the pick)."""
    if cfg.method == "distill":
        return _log_distill(log, i, rows)
    picked = [r for r in rows if r["best"] is not None]
    mean_r = sum(sum(r["rewards"]) / len(r["rewards"]) for r in picked) / max(1, len(picked))
    best_r = sum(r["rewards"][r["best"]] for r in picked) / max(1, len(picked))
    mean_j = sum(sum(r["judged"]) / len(r["judged"]) for r in picked) / max(1, len(picked))
    best_j = sum(r["judged"][r["best"]] for r in picked) / max(1, len(picked))
    eos = sum(sum(r["eos"]) for r in rows) / max(1, sum(len(r["eos"]) for r in rows))
    # how often the pick's content is right, against a random sample's and against "any of the
    # k" (what a perfect selector could reach): rejection sampling can only lift content where
    # the pick beats the policy's own rate (SPEC §11); measured, never used to pick
    # (on the problems: ordinary and borderline prompts; a request for a secret has no answer)
    problems = [r for r in picked if world.prompt_kind(r["messages"]) != "unsafe"]
    right = [[world.score(r["messages"], t).content == 1.0 for t in r["responses"]]
             for r in problems]
    n = max(1, len(problems))
    correct = {"random": sum(sum(c) / len(c) for c in right) / n,
               "picked": sum(c[r["best"]] for c, r in zip(right, problems)) / n,
               "any": sum(any(c) for c in right) / n}
    greedy = [world.score(r["messages"], r["greedy"]).content == 1.0 for r in problems
              if "greedy" in r]  # samples written before the greedy reply was kept have none
    if greedy:
        correct["greedy"] = sum(greedy) / len(greedy)
    # on requests for a secret, how often the reply is a violation: a random sample, the pick,
    # all of the k, the greedy reply (measured, never used to pick)
    unsafe = [r for r in picked if world.prompt_kind(r["messages"]) == "unsafe"]
    bad = [[world.safety_verdict(r["messages"], t).violation for t in r["responses"]]
           for r in unsafe]
    m = max(1, len(unsafe))
    violation = {"prompts": len(unsafe), "random": sum(sum(b) / len(b) for b in bad) / m,
                 "picked": sum(b[r["best"]] for b, r in zip(bad, unsafe)) / m,
                 "all": sum(all(b) for b in bad) / m}
    g_bad = [world.safety_verdict(r["messages"], r["greedy"]).violation for r in unsafe
             if "greedy" in r]
    if g_bad:
        violation["greedy"] = sum(g_bad) / len(g_bad)
    from_earlier = sum(g is not None and g["iteration"] < i for g in gold)
    log.write({"iteration": i, "selection": {"prompts_with_gold": sum(g is not None for g in gold),
               "reward_mean": mean_r, "reward_picked": best_r, "judged_mean": mean_j,
               "judged_picked": best_j, "eos_rate": eos, "pooled": pooled,
               "gold_from_earlier": from_earlier, "correct": correct,
               **({"violation": violation} if unsafe else {})}},
              f"V{i}: picked by the {'RM' if cfg.select == 'rm' else 'JUDGE (oracle)'} from "
              f"k={cfg.k} at T={rows[0]['temperature']:g}: reward {mean_r:+.3f} (a random sample) "
              f"-> {best_r:+.3f} (the pick); judged {mean_j:.3f} -> {best_j:.3f}; right answers "
              f"{correct['random']:.1%} -> {correct['picked']:.1%} (any of the k: "
              f"{correct['any']:.1%}" + (f"; the greedy reply: {correct['greedy']:.1%}"
                                         if greedy else "") + "); "
              + (f"violations on {len(unsafe)} requests for a secret {violation['random']:.1%} "
                 f"(a random sample) -> {violation['picked']:.1%} (the pick; all k violate: "
                 f"{violation['all']:.1%}" + (f"; the greedy reply: {violation['greedy']:.1%}"
                                              if g_bad else "") + "); " if unsafe else "")
              + "samples with "
              f"EOS {eos:.1%}; " + (f"pooled over V1..V{i}: {from_earlier} gold answers from "
                                    "earlier iterations" if pooled else "no pooling"))


def _log_distill(log, i, rows) -> None:
    """Context distillation's health line: on requests for a secret the violation rate of the
    answers with the safety preprompt, without it and of those kept; on borderline prompts their
    false-refusal rate (the judge is only read here, after the safety RM kept its answers)."""
    stats = {}
    for kind, rate in (("unsafe", "violation"), ("borderline", "false_refusal")):
        rs = [r for r in rows if r["responses"] and world.prompt_kind(r["messages"]) == kind]
        verdicts = [[getattr(world.safety_verdict(r["messages"], t), rate)
                     for t in r["responses"]] for r in rs]
        kept = [v[0] for v, r in zip(verdicts, rs) if r["best"] is not None]
        m = max(1, len(rs))
        stats[kind] = {"prompts": len(rs), "kept": len(kept), "measure": rate,
                       "with_preprompt": sum(v[0] for v in verdicts) / m,
                       "without": sum(v[1] for v in verdicts) / m,
                       "kept_rate": sum(kept) / max(1, len(kept))}
    u, b = stats["unsafe"], stats["borderline"]
    log.write({"iteration": i, "distill": stats},
              f"V{i}: context distillation kept {u['kept']}/{u['prompts']} answers to requests "
              f"for a secret and {b['kept']}/{b['prompts']} to borderline prompts; violations "
              f"{u['without']:.1%} without the preprompt, {u['with_preprompt']:.1%} with it, "
              f"{u['kept_rate']:.1%} of those kept; borderline refusals {b['without']:.1%} "
              f"without, {b['with_preprompt']:.1%} with, {b['kept_rate']:.1%} of those kept")


def report(out_dir: Path, cfg: Config, log) -> None:
    """Fig. 7, Fig. 8 and the per-iteration plot; the over-optimization line."""
    evs = [json.loads((out_dir / f"iter{i}" / "eval.json").read_text())
           for i in range(1, cfg.iterations + 2)]
    # context distillation samples at an untuned T: no tune.json, no Fig. 8
    tuned = cfg.method != "distill"
    tunes = [json.loads((out_dir / f"iter{i}" / "tune.json").read_text()) if tuned
             else {"temperature": untuned_temperature(cfg)}
             for i in range(1, cfg.iterations + 2)]
    evaluate.plot_best_of_n({e["label"]: e["best_of_n"] for e in evs}, out_dir / "best_of_n.png",
                            "Expected max (solid) and median (dashed) reward among N samples, "
                            f"{evaluate.split_words(cfg.eval_split)} prompts")
    if tuned:
        evaluate.plot_temperatures({f"V0 (start)": tunes[0]["curves"],
                                    f"V{cfg.iterations} (last)": tunes[-1]["curves"]},
                                   out_dir / "temperatures.png")
    rows = [{**e, "iteration": i} for i, e in enumerate(evs)]
    evaluate.plot_iterations(rows, out_dir / "iterations.png")
    vs = list(rows[0].get("win_rate_vs", {}))  # --compare: the win rates against other models
    lines = ["iteration | T | judged greedy | judged at T | RM greedy | RM at T | win rate greedy "
             "| win rate at T | EOS | tokens" + "".join(f" | vs {n} greedy | vs {n} at T" for n in vs)]
    for r, t in zip(rows, tunes):
        w = r.get("win_rate", {"greedy": 0.5, "sampled": 0.5})
        wv = r.get("win_rate_vs", {})
        lines.append(f"V{r['iteration']} | {t['temperature']:g} | {r['greedy']['judge']:.3f} | "
                     f"{r['sampled']['judge']:.3f} | {r['greedy']['rm']:+.3f} | "
                     f"{r['sampled']['rm']:+.3f} | {w['greedy']:.1%} | {w['sampled']:.1%} | "
                     f"{r['greedy']['eos_rate']:.1%} | {r['greedy']['tokens']:.1f}"
                     + "".join(f" | {wv[n]['greedy']:.1%} | {wv[n]['sampled']:.1%}" if n in wv
                               else " | - | -" for n in vs))
    f = rows[0]["floor"]
    lines.append(f"floors: judged {f['judge_empty']:.3f} (empty reply), "
                 f"{f['judge_bare_answer']:.3f} (bare correct answer), ceiling 1.0; RM "
                 f"{f['rm_empty']:+.3f} (empty reply); win rate 50%; EOS ceiling 100%")
    # over-optimization (Gao et al. 2022): the RM score rising while the judge falls. Greedy
    # replies are the fair comparison (the same decoding for every model; the tuned T moves);
    # each change from V0 to Vn against its paired standard error over the same prompts
    def change(decoding: str, key: str) -> tuple[float, float]:
        return evaluate.paired_gain(rows[-1][decoding][key + "_scores"],
                                    rows[0][decoding][key + "_scores"])
    for decoding in ("greedy", "sampled"):
        (d_rm, se_rm), (d_j, se_j) = change(decoding, "rm"), change(decoding, "judge")
        what = (f"{decoding + ' at T' if decoding == 'sampled' else decoding}: RM score "
                f"{d_rm:+.3f} (+-{se_rm:.3f}), judged score {d_j:+.3f} (+-{se_j:.3f}) from V0 to "
                f"V{cfg.iterations} (paired over {len(rows[0][decoding]['judge_scores'])} "
                f"{evaluate.split_words(cfg.eval_split)} prompts, +- one standard error)")
        if d_rm > 2 * se_rm and d_j < -2 * se_j:
            lines.append(f"OVER-OPTIMIZATION, {what}: the RM score rose while the judged score "
                         "fell; the policy exploits the reward model's errors")
        else:
            lines.append(f"over-optimization check, {what}: no RM rise together with a judged "
                         "fall beyond 2 standard errors")
    text = "\n".join(lines)
    with training.atomic_write(out_dir / "report.txt", "w") as fh:
        fh.write(text + "\n")
    log.print(text)
    log.print(f"wrote {out_dir / 'report.txt'}, best_of_n.png (Fig. 7), "
              + ("temperatures.png (Fig. 8), " if tuned else "") + "iterations.png")


# -----------------------------------------------------------------------------------------------
# PPO (--method ppo; Llama 2 §3.2.3, SPEC.md §9; CleanRL's ppo.py and "The N Implementation
# Details of RLHF with PPO", Huang et al. 2024). Plain functions, read top to bottom:
#   rollout -> score_rollouts -> old_pass (log-probs of the policy and pi_0, values) ->
#   token_rewards -> gae -> whiten_advantages -> ppo_update; run_ppo loops over iterations.
# Shapes: B rollouts in a mini-batch, L tokens of the longest prompt + response row, R tokens of
# the longest response, V the vocabulary.


def gather_chunks(mine: dict, rt) -> dict:
    """Under torchrun: every rank's {chunk index: results} merged on every rank (rollouts are
    small Python lists); with one process, `mine` itself."""
    if not rt.distributed:
        return mine
    parts = [None] * rt.world_size
    torch.distributed.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def all_sum(values: list, rt) -> torch.Tensor:
    """Sums over the ranks of a few local numbers, float64 (the local numbers with one process)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        torch.distributed.all_reduce(t)
    return t.cpu()


def rollout(policy, tokenizer, prompt_ids: list[list[int]], cfg, seed: int, rt,
            temperature: float | None = None) -> list[dict]:
    """One reply per prompt: pure sampling at cfg.temperature (top_p 1.0: no top-k, no top-p, so
    the sampled distribution is exactly softmax(logits / T), what the log-probs are recomputed
    with; temperature=0: greedy), batched with the KV cache.
    -> [{"prompt": ids, "response": ids (EOS kept), "eos"}].

    Under torchrun the chunks of gen_batch prompts are dealt round robin to the ranks and the
    rollouts gathered on every rank; chunk c is sampled with seed + c whatever the number of
    processes, so 2 processes roll out exactly what 1 process does."""
    T = cfg.temperature if temperature is None else temperature
    starts = range(0, len(prompt_ids), cfg.gen_batch)
    mine = {}
    policy.eval()
    with rt.autocast():
        for c in starts[rt.rank::rt.world_size]:
            chunk = prompt_ids[c:c + cfg.gen_batch]
            gens = policy.generate(chunk, cfg.max_new_tokens, temperature=T, top_p=1.0,
                                   seed=seed + c, eos_id=tokenizer.eos_id)
            mine[c] = [{"prompt": list(p), "response": g,
                        "eos": bool(g) and g[-1] == tokenizer.eos_id} for p, g in zip(chunk, gens)]
    policy.free_cache()
    mine = gather_chunks(mine, rt)
    return [r for c in starts for r in mine[c]]


@torch.no_grad()
def rm_logits(rm, seqs: list[list[int]], rt, safety: list[bool] | None = None) -> torch.Tensor:
    """The RM's raw head output (its LOGIT) read at the last token of each exact token sequence
    (prompt + sampled response ending with EOS): the policy's own tokens, never re-encoded text;
    for a CombinedReward both RMs' and the rule, with `safety` the prompts' IS_SAFETY labels.
    -> (N,) float32."""
    if isinstance(rm, CombinedReward):
        return rm.combine(rm_logits(rm.helpful, seqs, rt), rm_logits(rm.safety, seqs, rt),
                          safety if safety is not None else [False] * len(seqs))
    out = torch.empty(len(seqs), dtype=torch.float32)
    device = rm.tok_embeddings.weight.device
    for c in range(0, len(seqs), 32):
        b = llama2.pack_sequences(seqs[c:c + 32], rm.args.max_seq_len, device=device)
        with rt.autocast():
            out[c:c + 32] = rm(b["tokens"], b["ends"], cu_seqlens=b["cu_seqlens"]).float().cpu()
    return out


def score_rollouts(rm, rolls: list[dict], stats: tuple[float, float], no_eos_score: float,
                   rt) -> tuple[torch.Tensor, torch.Tensor]:
    """The scalar score of each rollout: the reward model's raw head output at the EOS, whitened
    with the statistics fixed once on pi_0's samples, (raw - mu) / sigma; "no EOS -> fixed low
    score" (never the RM's: a reply cut at the length limit must not be rewarded).
    -> (score (N,), raw RM logit (N,), nan without EOS).

    The paper's WHITEN(LOGIT(R_c)) (SPEC.md §7, §12): R_c is the helpfulness RM's score, or with
    --safety_rm the combination (CombinedReward, each rollout's "safety" label its prompt's
    IS_SAFETY); LOGIT of the paper's sigmoid score is the raw head output read here directly, so no
    sigmoid or logit is computed but the threshold's."""
    mu, sigma = stats
    raw = torch.full((len(rolls),), float("nan"))
    ok = [i for i, r in enumerate(rolls) if r["eos"]]
    if ok:
        raw[ok] = rm_logits(rm, [rolls[i]["prompt"] + rolls[i]["response"] for i in ok], rt,
                            [rolls[i].get("safety", False) for i in ok])
    score = torch.where(torch.isnan(raw), torch.tensor(no_eos_score), (raw - mu) / sigma)
    return score, raw


def whitening_stats(raw: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of pi_0's RM logits (replies with EOS), fixed for the run."""
    raw = raw[~torch.isnan(raw)]
    if len(raw) < 2:
        return 0.0, 1.0
    return float(raw.mean()), max(float(raw.std()), 1e-6)


def make_batch(rolls: list[dict], device) -> dict:
    """Right-padded rows of prompt + response, so every token keeps its position 0.. of the
    sequence alone (causal attention: the padding after it is never read).
    -> tokens (B, L); pos (B, R): the index of each response token in its row (clamped in the
    padding); mask (B, R): 1 on response tokens."""
    seqs = [r["prompt"] + r["response"] for r in rolls]
    L = max(len(s) for s in seqs)
    R = max(len(r["response"]) for r in rolls)
    tokens = torch.tensor([s + [0] * (L - len(s)) for s in seqs], dtype=torch.long)
    P = torch.tensor([len(r["prompt"]) for r in rolls])
    n = torch.tensor([len(r["response"]) for r in rolls])
    pos = (P[:, None] + torch.arange(R)[None, :]).clamp(max=L - 1)  # (B, R)
    mask = (torch.arange(R)[None, :] < n[:, None]).float()  # (B, R)
    return {"tokens": tokens.to(device), "pos": pos.to(device), "mask": mask.to(device)}


def response_logprobs(model, batch: dict, temperature: float, rt, entropy: bool = False):
    """log pi(token | prefix) of each response token, the logits divided by the rollout's
    temperature ("same T at rollout and re-scoring"). -> logp (B, R) [, entropy (B, R)]."""
    with rt.autocast():
        logits, _ = model(batch["tokens"])  # (B, L, V)
    logits = logits.float() / temperature
    pred = logits.gather(1, (batch["pos"] - 1)[..., None].expand(-1, -1, logits.size(-1)))  # (B, R, V): the logits that predict each response token
    logp_all = torch.log_softmax(pred, dim=-1)  # (B, R, V)
    logp = logp_all.gather(-1, batch["tokens"].gather(1, batch["pos"])[..., None]).squeeze(-1)
    if not entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def response_values(critic, batch: dict, rt) -> torch.Tensor:
    """The critic's value of each state before a response token: the RM's head at every position
    (the value model is the RM, initialized from it), read where the policy predicts the token.
    -> (B, R)."""
    with rt.autocast():
        v = critic(batch["tokens"])  # (B, L)
    return v.float().gather(1, batch["pos"] - 1)


def token_rewards(score: torch.Tensor, logp_old: torch.Tensor, logp_0: torch.Tensor,
                  mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: the KL penalty -beta * (logp_old - logp_0) at every response token, and
    the score added at the last response token (the EOS; the last sampled token without EOS).
    score (B,), the rest (B, R). -> (rewards (B, R), kl (B, R)), zero in the padding."""
    kl = (logp_old - logp_0) * mask  # per-token KL estimate to pi_0
    rewards = -beta * kl
    last = mask.sum(1).long() - 1  # (B,) index of the last response token
    rewards[torch.arange(len(score)), last] += score  # score at the EOS token
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over response tokens: delta_t =
    r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A zero after the last
    token (the episode ends at EOS). (B, R) each. -> (advantages, returns = advantages + values)."""
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.size(1))):
        next_v = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten_advantages(advs: list[torch.Tensor], masks: list[torch.Tensor], eps: float = 1e-8,
                      rt=None) -> list[torch.Tensor]:
    """Advantage whitening over the whole batch's response tokens (all its mini-batches, and under
    torchrun all the ranks' shares of them): (A - mean) / sqrt(var + eps), mean and population
    variance over the tokens where mask is 1; zero in the padding. Lists of (B_i, R_i)."""
    flat = torch.cat([a[m.bool()] for a, m in zip(advs, masks)]).double()
    if rt is None or not rt.distributed:
        mean, var = flat.mean(), flat.var(unbiased=False)
    else:  # two passes over all ranks' tokens: the mean, then the squared deviations from it
        n, total = all_sum([flat.numel(), flat.sum()], rt)
        mean = total / n
        var = all_sum([((flat.cpu() - mean) ** 2).sum()], rt)[0] / n
    mean, scale = float(mean), float(torch.rsqrt(var + eps))
    return [(a - mean) * scale * m for a, m in zip(advs, masks)]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def old_pass(policy, ref, critic, rm, rolls, order, cfg, stats, rt) -> list[dict]:
    """Everything the update reads, fixed before it: per mini-batch (the rollouts in `order`, cut
    in cfg.ppo_minibatch; under torchrun this rank's equal share of each), logp_old (B, R) of the
    policy and logp_0 of pi_0 (the same rows, the same padding, the same T), values_old (B, R),
    the score (B,), rewards, advantages (whitened over the whole batch, all ranks) and returns."""
    device = next(policy.parameters()).device
    share = cfg.ppo_minibatch // rt.world_size  # (run_ppo checks that it divides)
    mbs = []
    for c in range(0, len(order), cfg.ppo_minibatch):
        idx = order[c:c + cfg.ppo_minibatch]
        if rt.distributed:
            idx = idx[rt.rank * share:(rt.rank + 1) * share]
        mb = make_batch([rolls[i] for i in idx], device)
        mb["idx"] = idx
        mb["logp_old"], mb["entropy"] = response_logprobs(policy, mb, cfg.temperature, rt, True)
        mb["logp_0"] = response_logprobs(ref, mb, cfg.temperature, rt)
        mb["values_old"] = response_values(critic, mb, rt)
        mb["score"], mb["raw"] = score_rollouts(rm, [rolls[i] for i in idx], stats,
                                                cfg.no_eos_score, rt)
        mb["score"] = mb["score"].to(device)
        mb["rewards"], mb["kl"] = token_rewards(mb["score"], mb["logp_old"], mb["logp_0"],
                                                mb["mask"], cfg.beta)
        mb["adv"], mb["returns"] = gae(mb["rewards"], mb["values_old"], mb["mask"], cfg.gamma,
                                       cfg.lam)
        mbs.append(mb)
    for mb, a in zip(mbs, whiten_advantages([m["adv"] for m in mbs], [m["mask"] for m in mbs],
                                            rt=rt)):
        mb["adv"] = a  # advantage whitening, per batch over response tokens
    return mbs


def ppo_update(policy, critic, opt_pi, opt_v, mbs: list[dict], cfg, rt) -> dict:
    """One gradient step per mini-batch (Llama 2: batch 512, mini-batch 64, one step each): the
    clipped surrogate for the policy and the clipped value loss for the critic. -> statistics,
    with the first mini-batch's max |ratio - 1| (exactly 0: the old log-probs were computed by
    the same weights on the same rows), the mean and max ratio over the batch.

    Under torchrun policy and critic are DDP modules and each rank holds its share of every
    mini-batch: the losses are token means over the WHOLE mini-batch (the token count summed over
    the ranks), times world_size because DDP averages the gradients, so the step is the
    1-process step; the statistics are summed over the ranks likewise."""
    policy.train()  # (no dropout in this model: train and eval compute the same)
    critic.train()
    # per mini-batch sums over all ranks: pg loss, value loss, approx-KL, clipped tokens, ratio
    sums = torch.zeros(5, dtype=torch.float64)
    ratio_max, first_dev = 0.0, 0.0
    n_all = all_sum([mb["mask"].sum() for mb in mbs], rt)  # response tokens per mini-batch
    for j, mb in enumerate(mbs):
        m = mb["mask"]
        n = float(n_all[j])
        tok_mean = lambda x: (x * m).sum() / max(n, 1.0)  # noqa: E731  (over all ranks' tokens)
        logp = response_logprobs(policy, mb, cfg.temperature, rt)  # (B, R)
        logratio = (logp - mb["logp_old"]) * m  # zero in the padding (no overflow there)
        ratio = logratio.exp()
        # ratio clipping (PPO's clipped surrogate)
        pg = tok_mean(torch.max(-mb["adv"] * ratio,
                                -mb["adv"] * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio)))
        v = response_values(critic, mb, rt)  # (B, R)
        # value clipping: the new value at most clip_value from the old one
        v_clipped = mb["values_old"] + (v - mb["values_old"]).clamp(-cfg.clip_value,
                                                                    cfg.clip_value)
        vf = 0.5 * tok_mean(torch.max((v - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2))
        # separate models: each loss reaches only its own weights; DDP averages over the ranks
        ((pg + vf) * rt.world_size).backward()
        for model, opt in ((policy, opt_pi), (critic, opt_v)):
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            dev = float(((ratio - 1).abs() * m).max()) if m.numel() else 0.0
            if j == 0:
                first_dev = dev
            ratio_max = max(ratio_max, float((ratio * m).max()) if m.numel() else 0.0)
            # approx-KL between successive policies, the k3 estimator (ratio - 1) - log ratio
            sums += torch.tensor([float(pg), float(vf), float(tok_mean((ratio - 1) - logratio)),
                                  float(tok_mean(((ratio - 1).abs() > cfg.clip_ratio).float())),
                                  float(tok_mean(ratio))], dtype=torch.float64)
    policy.eval()
    critic.eval()
    sums = all_sum(sums.tolist(), rt) / len(mbs)
    extremes = torch.tensor([ratio_max, first_dev], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    return {"pg_loss": float(sums[0]), "value_loss": float(sums[1]), "approx_kl": float(sums[2]),
            "clipfrac": float(sums[3]), "ratio_mean": float(sums[4]),
            "ratio_max": float(extremes[0]), "first_ratio_dev": float(extremes[1])}


def batch_stats(mbs: list[dict], cfg, rt) -> dict:
    """The batch's health numbers from the old pass (per rollout, then averaged over all ranks'
    rollouts). score: the whitened score the PPO reward uses; rm_raw: the RM's logit (replies
    with EOS); kl: KL to pi_0 per reply, summed over its tokens."""
    per_roll = torch.stack([
        torch.cat([mb["score"].cpu() for mb in mbs]),
        torch.cat([mb["raw"] for mb in mbs]),
        torch.cat([mb["kl"].sum(1).cpu() for mb in mbs]),
        torch.cat([mb["mask"].sum(1).cpu() for mb in mbs]),
        torch.cat([(mb["entropy"] * mb["mask"]).sum(1).cpu() for mb in mbs])]).double()
    if rt.distributed:
        per_roll = torch.cat(list(gather_chunks({rt.rank: per_roll}, rt).values()), dim=1)
    score, raw, kl, n, ent = per_roll
    ok = raw[~torch.isnan(raw)]
    return {"score": float(score.mean()), "rm_raw": float(ok.mean()) if len(ok) else None,
            "kl": float(kl.mean()), "score_minus_beta_kl": float(score.mean() - cfg.beta * kl.mean()),
            "eos_rate": float((~torch.isnan(raw)).float().mean()), "length": float(n.mean()),
            "entropy": float(ent.sum() / n.sum())}


def judge_rollouts(tokenizer, dialogs, rolls) -> float:
    """The judge's mean score of the rollouts: MEASURED for the log only, after the update; the
    training never reads it."""
    replies = [sampling.Reply(sampling.clean_reply(tokenizer.decode(
        r["response"][:-1] if r["eos"] else r["response"])), r["eos"], len(r["response"]))
        for r in rolls]
    return sum(evaluate.judge_scores(dialogs, replies)) / max(1, len(replies))


@torch.no_grad()
def validate(policy, rm, val: tuple, cfg, stats, rt, tokenizer) -> list[float]:
    """The early-stopping numbers: the score (whitened RM logit, no EOS -> the low score) of one
    greedy reply per validation prompt (the world's validation split; val = (token ids, IS_SAFETY
    labels)), in prompt order so that two policies pair up; the same numbers on every rank."""
    gens = rollout(policy, tokenizer, val[0], cfg, 0, rt, temperature=0.0)
    for g, f in zip(gens, val[1]):
        g["safety"] = f
    v = score_rollouts(rm, gens, stats, cfg.no_eos_score, rt)[0].tolist()
    return training.broadcast_from_rank0(v, rt)  # every rank stops at the same iteration


def ppo_prompts(cfg, max_len: int, tokenizer):
    """The rollout pool (training-split problems) and the validation prompts (the world's
    validation split: disjoint from the pool and from the held-out test problems by construction);
    prompts with no room for max_new_tokens dropped; --safety_share of each are safety prompts.
    -> (pool dialogs, pool ids, (validation ids, their IS_SAFETY labels))."""
    val = training_prompts(cfg, cfg.val_prompts, "valid", cfg.seed + 1)
    pool = training_prompts(cfg, cfg.ppo_prompts, "train", cfg.seed)
    fits = lambda ids: len(ids) + cfg.max_new_tokens <= max_len  # noqa: E731
    pool = [(d, ids) for d in pool if fits(ids := llama2.encode_dialog(tokenizer, d)[0])]
    val = [(d, ids) for d in val if fits(ids := llama2.encode_dialog(tokenizer, d)[0])]
    if len(pool) < cfg.ppo_batch or not val:
        raise SystemExit(f"error: {len(pool)} rollout prompts fit the context, fewer than "
                         f"--ppo_batch {cfg.ppo_batch} (or no validation prompt fits); raise "
                         "--ppo_prompts or lower --max_turns / --max_new_tokens")
    return ([d for d, _ in pool], [ids for _, ids in pool],
            ([ids for _, ids in val], is_safety([d for d, _ in val])))


def run_ppo(cfg: Config, rt, stop_at) -> None:
    """PPO iterations from --checkpoint, the KL penalty to it (pi_0), early stopping on validation
    prompts, then the final evaluation on held-out prompts."""
    if rt.distributed and (cfg.ppo_minibatch % rt.world_size or cfg.ppo_batch % cfg.ppo_minibatch):
        raise SystemExit(f"error: under torchrun --ppo_minibatch {cfg.ppo_minibatch} must be a "
                         f"multiple of the {rt.world_size} processes and divide --ppo_batch "
                         f"{cfg.ppo_batch} (each rank takes an equal share of every mini-batch)")
    compared_checkpoints(cfg)  # a missing one is refused before the training, not after
    out_dir = Path(cfg.out_dir)
    resumed = ppo_resumed(cfg)
    # ---- models: the policy, pi_0 (a frozen copy), the critic (from the RM), the fixed RM
    policy, tokenizer, start_stage = load_policy(cfg, rt)
    ref = llama2.Transformer(policy.args).to(rt.device)
    ref.load_state_dict(policy.state_dict())
    ref.eval().requires_grad_(False)  # pi_0: frozen
    rm = reward_model(cfg, tokenizer, rt)
    rm.eval().requires_grad_(False)
    critic, _ = llama2.load_reward_model(cfg.reward_model, device=str(rt.device))
    critic = critic.float()  # value model initialized from the reward model
    max_len = min(policy.args.max_seq_len, rm.args.max_seq_len)
    dialogs, pool, val = ppo_prompts(cfg, max_len, tokenizer)
    opt_pi, opt_v = (training.optimizer_for(m, cfg, rt, lr)
                     for m, lr in ((policy, cfg.ppo_lr), (critic, cfg.value_lr)))
    out_dir.mkdir(parents=True, exist_ok=True)
    st = ppo_state(policy, critic, opt_pi, opt_v, resumed, cfg)
    log = training.open_metrics(out_dir, st["it"], rt)
    # the modules that train: DDP under torchrun (rollouts, the old pass and saving use the plain
    # models; the wrappers all-reduce the gradients of the update)
    ddp_policy, ddp_critic = training.wrap_model(policy, rt), training.wrap_model(critic, rt)
    log.print(f"PPO: pi_0 = {cfg.checkpoint} ({start_stage}, {policy.num_params() / 1e6:.2f}M "
              f"parameters), reward model and critic from {cfg.reward_model}"
              + (f", combined with the safety RM {cfg.safety_rm} (§3.2.2)" if cfg.safety_rm else "")
              + f"; {len(pool)} "
              f"rollout prompts, {len(val[0])} validation prompts; batch {cfg.ppo_batch}, "
              f"mini-batch {cfg.ppo_minibatch}, T={cfg.temperature:g}, beta={cfg.beta:g}; "
              f"{rt.device} x {rt.world_size} process(es)"
              + (f"; resumed after iteration {st['it']}" if resumed else ""))
    del resumed
    def save(final: bool = False) -> None:
        save_ppo(policy, critic, opt_pi, opt_v, tokenizer, st, cfg, rt, final)
    if st["stats"] is None:  # iteration 0: the whitening and pi_0's validation scores, fixed once
        ppo_start(policy, ref, rm, tokenizer, dialogs, pool, val, st, cfg, rt, log)
        save()
    while not st["done"] and st["it"] < cfg.ppo_iterations:
        st["it"] += 1
        ppo_iteration(policy, ref, critic, rm, ddp_policy, ddp_critic, opt_pi, opt_v, tokenizer,
                      dialogs, pool, val, st, cfg, rt, log)
        if cfg.patience and st["bad"] >= cfg.patience:
            log.print(f"early stop: no better validation score for {st['bad']} validations")
            st["done"] = True
        save()
        it = st["it"]
        if stop_at is not None and it == stop_at[0] and not st["done"] and it < cfg.ppo_iterations:
            log.print(f"stopped after PPO iteration {it} (--stop_at {cfg.stop_at})")
            return
    save(final=True)
    kept = st["kept"]
    log.print(f"PPO done after {st['it']} iterations; {out_dir / 'ckpt.pt'} holds "
              + (f"iteration {kept['iteration']}, validation score {kept['val_score']:+.3f}: "
                 f"{kept['val_diff']:+.3f} +- {kept['val_se']:.3f} (one paired standard error "
                 f"over {len(st['val_start'])} prompts) above pi_0" if kept["iteration"] else
                 f"pi_0 (validation score {kept['val_score']:+.3f}): no iteration beat it by more "
                 f"than {cfg.keep_se:g} paired standard errors (the best mean: {st['best']:+.3f})"))
    if rt.is_master and cfg.ppo_judge:  # this run's over-optimization curves and its line
        ppo_report([str(out_dir)], log.print)
    if cfg.eval and rt.is_master:  # rank 0 evaluates, the others wait in cleanup_runtime
        policy.load_state_dict(st["best_sd"])
        ppo_final_eval(policy, ref, rm, tokenizer, st["it"], cfg, rt, log)


def ppo_resumed(cfg: Config) -> dict | None:
    """With --resume, the PPO run's ckpt.pt, refused if it is not a PPO run's or its flags differ."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if not cfg.resume:
        return None
    if not ckpt_path.exists():
        raise SystemExit(f"error: --resume given but {ckpt_path} does not exist; drop "
                         "--resume to start a new run")
    resumed = training.load_checkpoint(ckpt_path)
    if resumed.get("stage") not in (PPO_STAGE, "rlhf") or resumed.get("method") != "ppo":
        raise SystemExit(f"error: {ckpt_path} is not a PPO run's checkpoint; use another "
                         "--out_dir")
    differ = [f"--{k}" for k in PPO_RESUME_SAME if resumed["config"].get(k) != getattr(cfg, k)]
    if differ:
        raise SystemExit(f"error: cannot resume from {ckpt_path}: {', '.join(differ)} differ "
                         "from the run that wrote it; use the same flags")
    if "val_start" not in resumed:
        raise SystemExit(f"error: cannot resume from {ckpt_path}: it predates the paired "
                         "validation (no val_start); start a new run")
    return resumed


def ppo_state(policy, critic, opt_pi, opt_v, resumed, cfg: Config) -> dict:
    """The run's state, what ckpt.pt keeps besides the weights: it (iterations done), stats (the
    whitening, fixed on pi_0's samples), best (the best validation mean so far) and bad (the
    validations since: patience), done; kept (the iteration whose weights best_sd holds, the run's
    model: pi_0 = iteration 0 until one beats it by more than keep_se standard errors) and
    val_start (pi_0's validation score per prompt, what each iteration is paired with). A resumed
    run also gets its weights, optimizers and RNG back."""
    st = {"it": 0, "stats": None, "best": None, "bad": 0, "best_sd": None, "done": False,
          "kept": None, "val_start": None}
    if not resumed:
        return st
    ckpt_path = str(Path(cfg.out_dir) / "ckpt.pt")
    training.check_same_model_args(resumed["model_args"], asdict(policy.args), ckpt_path)
    policy.load_state_dict(resumed["policy_last"])
    critic.load_state_dict(resumed["critic"])
    opt_pi.load_state_dict(resumed["opt_pi"])
    opt_v.load_state_dict(resumed["opt_v"])
    st.update(it=resumed["iteration"], stats=tuple(resumed["whiten"]), best=resumed["best_val"],
              bad=resumed["bad"], best_sd=resumed["model"], done=resumed.get("done", False),
              kept=resumed["kept"], val_start=resumed["val_start"])
    training.set_rng_state(resumed["rng"])
    return st


def save_ppo(policy, critic, opt_pi, opt_v, tokenizer, st: dict, cfg: Config, rt,
             final: bool = False) -> None:
    """<out_dir>/ckpt.pt: the kept policy as the run's model, the last policy, the critic, the
    optimizers and the run's state (stage rlhf_ppo; "rlhf" when done)."""
    if not rt.is_master:  # the ranks hold the same weights: rank 0 writes, atomically
        return
    sd = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
    training.save_checkpoint(Path(cfg.out_dir) / "ckpt.pt", {
        "model_args": asdict(policy.args),
        "model": st["best_sd"],  # the kept policy (pi_0 unless one beat it): the run's model
        "policy_last": sd(policy), "critic": sd(critic),
        "opt_pi": opt_pi.state_dict(), "opt_v": opt_v.state_dict(),
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "config": asdict(cfg), "stage": "rlhf" if final else PPO_STAGE, "method": "ppo",
        "parent": cfg.checkpoint, "iteration": st["it"], "whiten": list(st["stats"]),
        "best_val": st["best"], "bad": st["bad"], "kept": st["kept"],
        "val_start": st["val_start"], "done": final, "rng": training.rng_state()})


def ppo_start(policy, ref, rm, tokenizer, dialogs, pool, val, st: dict, cfg: Config, rt,
              log) -> None:
    """Iteration 0: the reward whitening statistics, fixed once on samples of pi_0; pi_0's
    validation scores (what each iteration is paired with); pi_0 is the kept model."""
    rolls = rollout(ref, tokenizer, pool[:cfg.whiten_n], cfg, cfg.seed * 13 + 5, rt)
    flags = is_safety(dialogs[:cfg.whiten_n])
    ok = [r["prompt"] + r["response"] for r in rolls if r["eos"]]
    raw = rm_logits(rm, ok, rt, [f for r, f in zip(rolls, flags) if r["eos"]]) if ok else \
        torch.empty(0)
    stats = tuple(training.broadcast_from_rank0(list(whitening_stats(raw)), rt))
    val_start = validate(policy, rm, val, cfg, stats, rt, tokenizer)
    best = sum(val_start) / len(val_start)
    st.update(stats=stats, val_start=val_start, best=best,
              kept={"iteration": 0, "val_score": best, "val_diff": 0.0, "val_se": 0.0},
              best_sd={k: v.detach().cpu().clone() for k, v in policy.state_dict().items()})
    # pi_0's samples are iteration 0 of the over-optimization curves (KL 0 by definition)
    row = {"step": 0, "iteration": 0, "beta": cfg.beta, "whiten": list(stats),
           "val_score": best, "val_diff": 0.0, "val_se": 0.0, "val_kept": True,
           "kl": 0.0, "eos_rate": len(ok) / len(rolls),
           "rm_raw": float(raw.mean()) if ok else None}
    if cfg.ppo_judge and rt.is_master:
        row["judge"] = judge_rollouts(tokenizer, dialogs[:cfg.whiten_n], rolls)
    log.write(row, f"pi_0: RM logit mean {stats[0]:+.3f} std {stats[1]:.3f} over {len(ok)} "
              f"of {len(rolls)} samples with EOS (the whitening, fixed)"
              + (f", judged {row['judge']:.3f}" if "judge" in row else "")
              + f"; validation score {best:+.3f}")


def ppo_iteration(policy, ref, critic, rm, ddp_policy, ddp_critic, opt_pi, opt_v, tokenizer,
                  dialogs, pool, val, st: dict, cfg: Config, rt, log) -> None:
    """One PPO iteration, st["it"]: rollout -> old pass (scores, rewards, GAE advantages) ->
    update -> health numbers; every val_every iterations the validation and the kept model."""
    it = st["it"]
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed * 7919 + it)
    pick = torch.randperm(len(pool), generator=g)[:cfg.ppo_batch].tolist()
    rolls = rollout(policy, tokenizer, [pool[i] for i in pick], cfg, cfg.seed * 31 + it, rt)
    for r, f in zip(rolls, is_safety([dialogs[i] for i in pick])):
        r["safety"] = f  # the prompt's IS_SAFETY, for the combined reward
    order = torch.randperm(len(rolls), generator=g).tolist()  # the mini-batches' rows
    mbs = old_pass(policy, ref, critic, rm, rolls, order, cfg, st["stats"], rt)
    upd = ppo_update(ddp_policy, ddp_critic, opt_pi, opt_v, mbs, cfg, rt)
    row = {"step": it, "iteration": it, **batch_stats(mbs, cfg, rt), **upd}
    if cfg.ppo_judge and rt.is_master:  # measured only, after the update: never trained on
        row["judge"] = judge_rollouts(tokenizer, [dialogs[i] for i in pick], rolls)
    se = None
    if it % cfg.val_every == 0 or it == cfg.ppo_iterations:
        scores = validate(policy, rm, val, cfg, st["stats"], rt, tokenizer)
        v = sum(scores) / len(scores)
        diff, se = evaluate.paired_gain(scores, st["val_start"])
        if v > st["best"]:  # early stopping by the RM score on validation prompts
            st["best"], st["bad"] = v, 0
        else:
            st["bad"] += 1
        # the run's model: an iteration replaces the kept one only if it scores higher and
        # beats pi_0 beyond noise, by more than keep_se paired standard errors
        better = v > st["kept"]["val_score"] and diff > (cfg.keep_se * se if cfg.keep_se else 0.0)
        if better:
            st["kept"] = {"iteration": it, "val_score": v, "val_diff": diff, "val_se": se}
            st["best_sd"] = {k: t.detach().cpu().clone() for k, t in policy.state_dict().items()}
        row.update(val_score=v, val_diff=diff, val_se=se if math.isfinite(se) else None,
                   val_kept=better)
    row["seconds"] = time.perf_counter() - t0
    log.write(row, f"PPO {it}/{cfg.ppo_iterations}: score {row['score']:+.3f} KL "
              f"{row['kl']:.3f} score-beta*KL {row['score_minus_beta_kl']:+.3f}"
              + (f" judge {row['judge']:.3f}" if "judge" in row else "")
              + f" | EOS {row['eos_rate']:.0%} len {row['length']:.1f} entropy "
              f"{row['entropy']:.2f} | approx-KL {row['approx_kl']:.2e} clipfrac "
              f"{row['clipfrac']:.3f} ratio mean {row['ratio_mean']:.4f} max "
              f"{row['ratio_max']:.3f} value loss {row['value_loss']:.4f}"
              + (f" | val {row['val_score']:+.3f} (best {st['best']:+.3f}), vs pi_0 "
                 f"{row['val_diff']:+.3f} +- {se:.3f}" + (" (kept)" if row["val_kept"] else "")
                 if "val_score" in row else "") + f" | {row['seconds']:.1f}s")


def ppo_final_eval(policy, ref, rm, tokenizer, it: int, cfg: Config, rt, log) -> None:
    """The kept policy on held-out prompts: its win rate against the start policy (eval_start.json,
    eval_final.json), then against each --compare model (into eval_final.json under "compare")."""
    out_dir = Path(cfg.out_dir)
    cache = {}
    for name, model in (("start", ref), ("final", policy)):
        path = out_dir / f"eval_{name}.json"
        if cfg.resume and path.is_file():  # a fresh run into the same folder measures anew
            cache[name] = json.loads(path.read_text())
            continue
        cache[name] = evaluate.policy_eval(model, tokenizer, rm, cfg, cfg.temperature,
                                           cache.get("start"), rt,
                                           label="pi_0" if name == "start" else "PPO")
        with training.atomic_write(path, "w") as f:
            f.write(json.dumps(cache[name]))
        log.write({"step": it, "eval": name, **_light(cache[name])},
                  evaluate.format_policy_eval(cache[name]))
    # the final model against other models (--compare, e.g. the SFT and RS models): win rate on
    # the same held-out prompts, adherence by turn; into eval_final.json
    final = cache["final"]
    for name, path in parse_compare(cfg.compare).items():
        if final.get("compare", {}).get(name, {}).get("checkpoint") == path:
            continue  # measured by an earlier (resumed) run
        other = load_compare(path, tokenizer, rt)
        v = evaluate.versus(final, other, tokenizer, rm, cfg, rt, label=name)
        del other
        final.setdefault("compare", {})[name] = {"checkpoint": path, **v}
        with training.atomic_write(out_dir / "eval_final.json", "w") as f:
            f.write(json.dumps(final))
        log.write({"step": it, "eval": f"final_vs_{name}", "win_rate": v["win_rate"],
                   "judge": {k: v[k]["judge"] for k in ("greedy", "sampled")},
                   "adherence_by_turn": v["adherence_by_turn"]},
                  evaluate.format_versus(final, v))


def ppo_rows(run_dir: Path) -> list[dict]:
    """A PPO run's per-iteration rows from its metrics.jsonl (iteration 0: pi_0's samples)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: --report {run_dir}: no metrics.jsonl (not a PPO run's --out_dir)")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "kl" in r and "eval" not in r and "iteration" in r]


def ppo_report(run_dirs: list[str], say=print) -> dict:
    """The over-optimization report of one or several finished PPO runs (e.g. a --beta sweep):
    ppo_overopt.png (RM and judged score of the rollouts against sqrt KL, the runs overlaid),
    ppo_report.txt (the table) and ppo_report.json ({label: run_dir and overopt_summary}),
    written to the runs' common parent folder (the run's own folder for one run)."""
    runs, summaries = {}, {}
    for d in run_dirs:
        rows = ppo_rows(Path(d))
        beta = rows[0].get("beta") if rows else None
        label = f"beta={beta:g}" if beta is not None else Path(d).name
        label = f"{label} ({d})" if label in runs else label
        try:
            summaries[label] = {"run_dir": d, **evaluate.overopt_summary(rows)}
        except ValueError as e:
            raise SystemExit(f"error: --report {d}: {e} (run with --ppo_judge true)") from None
        runs[label] = rows
    dirs = [str(Path(d).resolve()) for d in run_dirs]
    where = Path(dirs[0] if len(dirs) == 1 else os.path.commonpath(dirs))
    evaluate.plot_overopt(runs, where / "ppo_overopt.png", summaries)
    text = evaluate.overopt_table(summaries)
    with training.atomic_write(where / "ppo_report.txt", "w") as f:
        f.write(text + "\n")
    with training.atomic_write(where / "ppo_report.json", "w") as f:
        f.write(json.dumps(summaries, indent=1))
    say(text)
    say(f"wrote {where / 'ppo_overopt.png'}, ppo_report.txt, ppo_report.json")
    return summaries


# -----------------------------------------------------------------------------------------------
# shared by both methods: the inputs (start policy, --compare models) and their checks


def parse_compare(text: str) -> dict[str, str]:
    """--compare "sft=PATH,rs=PATH" -> {"sft": PATH, "rs": PATH} (order kept)."""
    out = {}
    for item in (x for x in text.split(",") if x):
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in out:
            raise SystemExit(f"error: --compare {text!r}: give name=checkpoint pairs with "
                             "distinct names, comma-separated, e.g. sft=out/pipeline/sft,"
                             "rs=out/pipeline/rs/V3")
        out[name] = path
    return out


def compared_checkpoints(cfg: Config) -> dict[str, str]:
    """--compare as {name: checkpoint}; with --eval each must exist (refused at the start of a run,
    not by check_config, so the pipeline's commands parse before the models they name exist)."""
    compare = parse_compare(cfg.compare)
    for name, path in compare.items():
        if cfg.eval and not Path(path).exists():
            raise SystemExit(f"error: --compare {name}={path}: no such checkpoint")
    return compare


def load_compare(path: str, tokenizer, rt, flag: str = "--compare"):
    """A model to compare against (or, flag --sampler, to draw the samples): any chat checkpoint
    with the policy's tokenizer."""
    try:
        model, tok = llama2.load_model(path, device=str(rt.device))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {flag} {path}: {e}") from None
    if tok is None or tok.model_bytes != tokenizer.model_bytes:
        raise SystemExit(f"error: {flag} {path} does not use the policy's tokenizer; train both "
                         "on the same data with the same vocabulary size")
    return model.float().eval()


def load_policy(cfg: Config, rt):
    """The start policy: one of our chat checkpoints (or an external chat model); a pretrained
    base model or a reward model is refused with one line."""
    try:
        stage = training.stage_of(cfg.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint}: {e}") from None
    if stage == "pretrain":
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint} is a pretrained (non-chat) model; "
                         "rejection sampling starts from a chat model: fine-tune it with "
                         "train_sft.py first")
    if stage is not None and stage not in CHAT_STAGES:
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint} is a {stage!r} checkpoint, not a "
                         f"chat model ({', '.join(CHAT_STAGES)})")
    try:
        model, tok = llama2.load_model(cfg.checkpoint, device=str(rt.device))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint}: {e}") from None
    if tok is None:
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint} carries no tokenizer")
    return model.float(), tok, stage or "external"


def check_config(cfg: Config) -> None:
    """Bad flags -> one `error:` line, before any work."""
    if cfg.method not in ("rs", "ppo", "distill"):
        raise SystemExit(f"error: --method {cfg.method!r}: use rs (rejection sampling), ppo or "
                         "distill (safety context distillation)")
    if cfg.method == "distill" and cfg.targeted and not cfg.safety_rm:
        raise SystemExit("error: --method distill --targeted true keeps an answer where the safety "
                         "RM prefers it: give --safety_rm, or --targeted false")
    if cfg.method == "distill" and (cfg.sampler or cfg.select != "rm"):
        raise SystemExit("error: --method distill generates its own answers with the safety "
                         "preprompt: leave out --sampler and --select")
    if cfg.method == "ppo":
        for flag in ("ppo_iterations", "ppo_prompts", "ppo_batch", "ppo_minibatch", "whiten_n",
                     "val_prompts", "val_every"):
            if getattr(cfg, flag) < 1:
                raise SystemExit(f"error: --{flag} must be >= 1, got {getattr(cfg, flag)}")
        if cfg.temperature <= 0:
            raise SystemExit(f"error: --temperature {cfg.temperature}: PPO samples, give T > 0")
        if cfg.beta < 0 or cfg.ppo_lr <= 0 or cfg.value_lr <= 0:
            raise SystemExit("error: --beta must be >= 0, --ppo_lr and --value_lr > 0")
        if not cfg.keep_se >= 0:
            raise SystemExit(f"error: --keep_se {cfg.keep_se}: give the number of standard "
                             "errors (>= 0) by which an iteration must beat pi_0 to be kept")
    parse_compare(cfg.compare)
    if cfg.sampler and cfg.method == "ppo":
        raise SystemExit("error: --sampler is rejection sampling's (distillation: another model "
                         "draws the samples); PPO's rollouts are the policy's own, leave it out")
    if not 0 <= cfg.safety_share <= 1:
        raise SystemExit(f"error: --safety_share {cfg.safety_share}: give a share in [0, 1]")
    if cfg.select not in ("rm", "judge"):
        raise SystemExit(f"error: --select {cfg.select!r}: use rm (the recipe) or judge (an "
                         "ORACLE ablation)")
    for flag in ("iterations", "prompts", "k", "tune_prompts", "batch_size", "micro_batch"):
        if getattr(cfg, flag) < 1:
            raise SystemExit(f"error: --{flag} must be >= 1, got {getattr(cfg, flag)}")
    if cfg.batch_size % cfg.micro_batch:
        raise SystemExit(f"error: --batch_size {cfg.batch_size} is not a multiple of "
                         f"--micro_batch {cfg.micro_batch}")
    try:
        grid = [float(t) for t in cfg.temperatures.split(",") if t]
    except ValueError:
        grid = []
    if not grid or min(grid) <= 0:
        raise SystemExit(f"error: --temperatures {cfg.temperatures!r}: give positive "
                         "temperatures, comma-separated, e.g. 0.6,0.8,1.0,1.2,1.5")
    for flag in ("prompt_levels", "eval_levels"):
        try:
            world.parse_levels(getattr(cfg, flag))
        except ValueError as e:
            raise SystemExit(f"error: --{flag}: {e}") from None
    if cfg.eval and (cfg.eval_k < 1 or cfg.eval_n < 1 or cfg.eval_bestof_n < 1):
        raise SystemExit("error: --eval_n, --eval_bestof_n and --eval_k must be >= 1")


def _light(ev):
    """An evaluation without its per-prompt score lists, at any depth (for metrics.jsonl)."""
    if not isinstance(ev, dict):
        return ev
    return {k: _light(v) for k, v in ev.items() if not (k.endswith("_scores") or k == "rm_parts")}


# -----------------------------------------------------------------------------------------------
# the script


def main(argv=None) -> None:
    cfg = training.parse_config(Config, argv, description=__doc__)
    if cfg.report:  # the over-optimization report of finished runs: no models, no training
        ppo_report([d for d in cfg.report.split(",") if d])
        return
    check_config(cfg)
    stop_at = parse_stop_at(cfg.stop_at)
    rt = training.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    try:
        (run_ppo if cfg.method == "ppo" else run)(cfg, rt, stop_at)
    finally:
        training.cleanup_runtime()


if __name__ == "__main__":
    main()
    training.end_process()  # under torchrun: no interpreter teardown (see there)
