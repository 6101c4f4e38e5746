"""Ghost Attention data construction (for train_sft.py); the replies are sampled with
sampling.generate_replies, the one batched chat sampler.

Ghost Attention (Llama 2 paper §3.3 and A.3.5, SPEC.md §6) is a way of building fine-tuning
data, not a change to the model: no extra token, no change to attention.

  1. take user prompts u1..un (world.gatt_dialogs) and a standing instruction `inst` in its full
     wording (GAtt never sees world.GATT_UNSEEN, which evaluation keeps for unseen instructions);
  2. append `inst` to EVERY user message (world.with_instruction_in_every_user_turn) and sample
     the replies a1..an with the current model, turn by turn, the chosen reply going into the
     history. `--gatt_select` says how a reply is chosen: "none" (one sample; the default), "judge"
     (best of K by the world's judge, kept only if it obeys: an ORACLE ablation, because the
     judge is also what evaluates), "rm" (best of K by the reward model, `--gatt_rm`, as the paper
     samples "analogous to rejection sampling"; the paper applied GAtt after RLHF V3, when an RM
     existed; our pipeline runs GAtt before the RM, so its default stays "none");
  3. for training, keep `inst` only once, as the system message (world.with_instruction_as_system;
     shortened half of the time, world.shorten, as the paper), and zero the loss on every token
     except the kept answers: ONE example per dialog, "train_on" a flag per answer. With a causal
     model that is the same loss as cutting the dialog after each kept answer, in 1/6 of the
     tokens at 12 turns. A reply that did not end with EOS never carries loss.

The judged evaluation of chat models lives in evaluate.py.
"""
from __future__ import annotations

import random

import numpy as np
import torch

import llama2
import sampling
import world

# -----------------------------------------------------------------------------------------------
# Ghost Attention data


GATT_SELECT = ("judge", "rm", "none")


def _pick(history: list[dict], cands: list[sampling.Reply], inst: world.Standing, select: str,
          rewards: list[float] | None = None):
    """The reply that goes into the history, and whether it carries loss.

    "rm" (the recipe): the best of the K candidates that ended with EOS by the reward model's
    `rewards` (one per candidate; the RM reads a reply at its EOS, so a cut-off reply cannot
    compete); no other filter. "judge" (an oracle ablation: the evaluation's own gold standard
    picks): the best of the K candidates by world.score, kept only if it obeys the instruction and
    ended with EOS. "none": the one sample, kept whatever it says. In every case a reply cut off
    by max_new_tokens carries no loss: training on it would teach an EOS where the model did not
    stop.
    """
    if select == "rm":
        ended = [j for j, c in enumerate(cands) if c.eos]
        if not ended:
            return cands[0], False
        best = cands[max(ended, key=lambda j: rewards[j])]  # ties: the first sampled
        return best, True
    if select == "judge":
        scores = [world.score(history, c.text, c.eos).total for c in cands]
        best = cands[int(np.argmax(scores))]  # ties: the first sampled
        return best, best.eos and inst.obeys(best.text)
    return cands[0], cands[0].eos


def build_gatt_data(model, tokenizer, cfg, rt=None, seq_len: int | None = None, rm=None
                    ) -> tuple[list[tuple[list[dict], list[bool]]], dict]:
    """Roll out world.gatt_dialogs with the instruction in every user message, then turn each
    dialog into ONE training example: the instruction once, as the system message (shortened
    half of the time, as the paper did), and loss on every kept answer.

    One example per dialog rather than one per turn: with a causal model, the loss on answer k of
    the whole dialog is the loss of the dialog cut after answer k, so the cut copies only repeat
    the prefix (about 6x the tokens at 12 turns) for the same gradient. A dialog too long for
    seq_len is cut after the last whole turn that fits.
    Returns ([(messages, train_on flags per assistant message), ...], stats).
    """
    select = cfg.gatt_select
    if select not in GATT_SELECT:
        raise ValueError(f"--gatt_select must be one of {GATT_SELECT}, got {select!r}")
    if select == "rm" and rm is None:
        raise ValueError("--gatt_select rm needs a reward model (rm=, train_sft.py --gatt_rm)")
    k = cfg.gatt_k if select in ("judge", "rm") else 1
    seq_len = seq_len or model.args.max_seq_len
    levels = world.parse_levels(cfg.gatt_levels)
    seeds = world.gatt_dialogs(cfg.gatt_n, seed=cfg.seed + 3, min_turns=cfg.gatt_min_turns,
                               max_turns=cfg.gatt_max_turns, levels=levels)
    plain: list[list[dict]] = [[] for _ in seeds]  # the dialogs without the instruction
    keep: list[list[bool]] = [[] for _ in seeds]   # per answer: carries loss
    alive = [True] * len(seeds)
    n_eos = n_obey = n_turns = 0
    for t in range(max(len(s.prompts) for s in seeds)):
        active = [i for i, s in enumerate(seeds) if alive[i] and t < len(s.prompts)]
        if not active:
            break
        for i in active:
            plain[i].append({"role": "user", "content": seeds[i].prompts[t]})
        # GAtt step 2: the model answers with the instruction appended to every user message
        asked = [world.with_instruction_in_every_user_turn(plain[i], seeds[i].inst)
                 for i in active]
        replies = sampling.generate_replies(model, tokenizer, asked, n=k,
                                            temperature=cfg.gatt_temperature,
                                            max_new_tokens=cfg.max_new_tokens,
                                            seed=cfg.seed * 7919 + t, batch=cfg.gen_batch, rt=rt,
                                            desc=f"GAtt turn {t + 1}")
        rewards = [None] * len(active)
        if select == "rm":  # one batched RM call per turn over every candidate that ended
            jobs = [(a, j) for a, cands in enumerate(replies) if cands is not None
                    for j, c in enumerate(cands) if c.eos]
            if jobs:
                with torch.no_grad():
                    r = rm.score([asked[a] for a, _ in jobs],
                                 [replies[a][j].text for a, j in jobs]).tolist()
                rewards = [[float("-inf")] * k for _ in active]
                for (a, j), v in zip(jobs, r):
                    rewards[a][j] = v
        for i, history, cands, rw in zip(active, asked, replies, rewards):
            if cands is None:  # the history no longer fits the context: the dialog ends here
                alive[i] = False
                plain[i].pop()
                continue
            reply, kept = _pick(history, cands, seeds[i].inst, select, rw)
            plain[i].append({"role": "assistant", "content": reply.text})
            keep[i].append(kept)
            n_turns += 1
            n_eos += reply.eos
            n_obey += seeds[i].inst.obeys(reply.text)  # measured only, whatever the selection
    # GAtt step 3: the instruction once, as the system message; loss on the kept answers only
    rng = random.Random(f"gatt-shorten-{cfg.seed}")
    samples, n_cut = [], 0
    for s, dialog, kept in zip(seeds, plain, keep):
        train = world.with_instruction_as_system(dialog, world.shorten(s.inst, rng))
        n = max((j + 1 for j, ok in enumerate(kept) if ok), default=0)  # up to the last kept
        while n and len(llama2.encode_dialog(tokenizer, train[:1 + 2 * n], True)[0]) - 1 > seq_len:
            n -= 1
        n_cut += n < len(kept) and any(kept[n:])
        if any(kept[:n]):
            samples.append((train[:1 + 2 * n], kept[:n]))
    stats = {"select": select, "k": k, "temperature": cfg.gatt_temperature,
             "dialogs": len(seeds), "turns": n_turns,
             "kept_turns": sum(sum(f) for _, f in samples), "samples": len(samples),
             "cut_to_fit": n_cut, "eos_rate": n_eos / max(1, n_turns),
             "obey_rate": n_obey / max(1, n_turns)}
    return samples, stats
