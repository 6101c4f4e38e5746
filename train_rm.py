"""Stage 3 of the Llama 2 recipe: the reward model (paper §3.2.2 and A.3.3, SPEC.md §7).

Preference pairs. For a prompt, two responses sampled from two different model variants (a
checkpoint at a temperature, e.g. the SFT and GAtt models at T in {0.6, 0.9, 1.2}); a simulated
annotator (world.prefer: the judge's score gap plus seeded Gaussian noise) picks one and rates how
much better it is, on the paper's four levels. Prompts are single- and multi-turn dialogs, half of
them with a standing instruction (as the system message or in every user message), so the RM
learns adherence as well as content. Training pairs come from training-split problems, test pairs
only from held-out ones (world's split). Each pair also stores the noise-free judge's verdict.
The pairs are cached as JSONL in <out_dir> and rebuilt when their inputs change. `--pairs` reads
your own instead: ours ({"messages": [... user], "chosen": str, "rejected": str, "rating": str})
or TRL's ("chosen"/"rejected" as message lists, optional "prompt", optional numeric "margin").

Safety (`--objective safety`, paper §4.2, SPEC.md §12). The same machinery on safety prompts
(world.safety_prompts: requests for a secret, most of them adversarial, and borderline prompts),
labelled by the safety annotators (world.prefer(objective="safety")), each pair with its category
(the chosen reply safe and the other not, both safe, both unsafe; pairs with the unsafe reply
chosen are dropped, as in the paper), mixed 90/10 with helpfulness pairs (--helpful_share). The
helpfulness RM can take a share of safety pairs (--safety_pairs; all of them is the one-RM
ablation). Either RM is then evaluated on both held-out sets; on safety pairs also by category
and by how well sigmoid(reward) < 0.15 finds unsafe replies (precision and recall).

The model. The chat model with its next-token head replaced by a scalar head
(llama2.RewardModel), initialized from an SFT or GAtt checkpoint; the reward is read at each
response's EOS. Loss: -log sigmoid(r_chosen - r_rejected - m(rating)), m from --margin
none | small | large (SPEC.md table: significantly / better / slightly / negligibly-unsure =
1, 2/3, 1/3, 0 or 3, 2, 1, 0). Chosen and rejected sequences share micro-batches, packed with
cu_seqlens (no attention across sequences). The recipe: 1 epoch, cosine to 10% with warmup 3% of
the steps (at least 5), AdamW 0.9/0.95/1e-5, weight decay 0.1, clipping 1.0, batch in pairs.

Evaluation (`--eval`, and at the end of training), on the held-out pairs: accuracy per rating
bucket against the annotators' labels (the paper's Table 8) and against the noise-free judge's,
beside the ceiling (the judge's own accuracy against the annotators: no RM can do better) and the
floor (50%, a coin); the Spearman correlation of RM score with the judge's score over the held-out
responses; a calibration table (sigmoid(r_a - r_b) in bins against the observed win rate); a PNG.

    python train_rm.py                                           # the CPU demo: pairs, train, evaluate
    python train_rm.py --margin large --seed 2 --out_dir out/rm_large2
    python train_rm.py --eval --checkpoint out/rm                # evaluate a reward model
    python train_rm.py --objective safety --out_dir out/rm_safety   # the safety RM (§4.2)
    python train_rm.py --pairs prefs.jsonl --test_pairs test.jsonl --checkpoint llama-2-7b-chat \\
        --lr 1e-5 --batch_size 512 --micro_batch 8              # the paper's hyperparameters
    torchrun --nproc_per_node=2 train_rm.py --device cpu          # data parallel (DDP; --parallel fsdp)
    python train_rm.py --export_hf out/rm-hf --checkpoint out/rm # LlamaForSequenceClassification

Checkpoint: <out_dir>/ckpt.pt ("stage": "rm", "model" with reward_head.weight, optimizer, step,
RNG, data key for an exact `--resume`); load with llama2.load_reward_model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# OpenMP threads that busy-wait stall when other processes share the cores (as in train_sft.py;
# here batched generation with 2 default threads ran 4x slower than with 1 beside two other jobs).
# Let them sleep; read when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import llama2  # noqa: E402
import training  # noqa: E402
from evaluate import eval_split, split_words  # noqa: E402  (train_rm.evaluate is the RM evaluation)
import world  # noqa: E402

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # model
    checkpoint: str = "out/pipeline/sft"  # chat model (SFT/GAtt) the RM starts from; with --eval / --export_hf: the reward model
    tokenizer: str = ""  # tokenizer.model, only if the checkpoint carries none (Meta / HF dirs)
    # preference pairs
    pairs: str = ""  # training pairs, JSONL (ours or TRL's), comma-separated; "" = build them with --pair_models
    test_pairs: str = ""  # held-out pairs, JSONL; "" = build them with --pair_models
    pair_models: str = "out/pipeline/sft,out/pipeline/gatt2"  # chat checkpoints whose samples are compared (the pipeline's SFT and GAtt models)
    pair_temperatures: str = "0.6,1.0,1.4"  # sampling temperatures; a variant is (model, temperature), two different ones per pair (a wider spread than 0.6-1.2 ties fewer pairs, BENCHMARKS.md)
    n_train: int = 1200  # training pairs built (one per training-split prompt)
    n_test: int = 1000  # held-out pairs built (the paper: 1000 per annotation batch)
    train_frac: float = 1.0  # train on this share of the training pairs (the training-set-size curve)
    synthetic_pairs: int = 0  # + this many "open-source" pairs (the paper's Synthetic GPT-J, Table 6): a careful answer against the same reply with one flaw, on training-split prompts, labelled by the same annotators; 0 = none
    synthetic_flaws: str = "wrong,incomplete,no_instruction,rambling"  # the flaws those pairs' worse replies carry (world.FLAWS), drawn uniformly
    objective: str = "helpfulness"  # who labels the pairs: helpfulness (annotators weigh the judge's score, on chat prompts) or safety (the safety annotators, world.prefer(objective="safety"), on safety prompts: requests for a secret and borderline prompts; the paper's safety RM, §4.2)
    safety_n_train: int = 2000  # safety training pairs built (one per training-split safety prompt), when a run uses them
    safety_n_test: int = 500  # held-out safety pairs built (the safety RM's test set; also read by a helpfulness RM that trains on safety pairs)
    safety_pairs: int = 0  # helpfulness RM: + this many of the safety training pairs (the paper mixes Meta Safety into the helpfulness RM's data; all of them: the one-RM ablation); 0 = none
    helpful_share: float = 0.1  # safety RM: share of its training pairs that are helpfulness pairs (the paper: 90/10; they help most where both replies are safe)
    safety_p_unsafe: float = 0.5  # share of the safety prompts that ask for a secret (the rest are borderline)
    pair_levels: str = "1,2"  # difficulty levels of the prompts
    pair_p_instruction: float = 0.6  # share of prompts with a standing instruction
    pair_max_turns: int = 4  # user turns per prompt, 1..this (earlier ones answered by the careful human)
    annotator_noise: float = 0.1  # sd of the noise annotators add to the judge's score gap (world.prefer)
    max_new_tokens: int = 48  # longest sampled response
    gen_batch: int = 64  # prompts per batched generate call
    # objective
    margin: str = "small"  # margin m(rating) in the loss: none (InstructGPT), small (1, 2/3, 1/3, 0), large (3, 2, 1, 0)
    seq_len: int = 0  # tokens per packed row (0 = the model's context); longer pairs are dropped
    # optimization (Llama 2 RM, §3.2.2)
    epochs: float = 1.0  # passes over the pairs (Llama 2: 1, longer overfits)
    batch_size: int = 32  # pairs per optimizer step (Llama 2: 512)
    micro_batch: int = 16  # pairs per forward pass (chosen + rejected packed together)
    # lr on 4,000 pairs from sft_long, held-out average (BENCHMARKS.md, RM session 6): 2.5e-4 58.0 (3 seeds),
    # 5e-4 56.9 (2 seeds), 1.25e-4 57.6, 1e-3 54.6, 2e-3 51.0 (Llama 2: 1e-5; a 3M model barely moves at 1e-5)
    lr: float = 2.5e-4  # peak learning rate
    warmup_frac: float = 0.03  # linear warmup over this share of the steps (Llama 2: 0.03)
    min_warmup: int = 5  # ... but at least this many steps (Llama 2: 5)
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak lr (Llama 2: 0.1)
    weight_decay: float = 0.1  # AdamW weight decay on the weight matrices (Llama 2: 0.1)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-5  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    parallel: str = "ddp"  # under torchrun: ddp or fsdp
    # evaluation and export
    eval: bool = False  # evaluate the reward model --checkpoint on the held-out pairs instead of training
    eval_split: str = "heldout"  # the problems the evaluation pairs come from: heldout (the test split, for the report) or valid (the validation split, to choose the RM's flags on: pairs_valid.jsonl)
    eval_after: bool = True  # evaluate at the end of training
    export_hf: str = ""  # write the reward model --checkpoint as a Hugging Face LlamaForSequenceClassification folder
    report: str = ""  # eval.json files (comma-separated, globs): the margin / training-size table over seeds and the histograms, into --out_dir
    # logging and checkpoints
    out_dir: str = "out/rm"  # where ckpt.pt, metrics.jsonl, the cached pairs and eval.json go
    pairs_dir: str = ""  # where built pairs are cached (default: out_dir)
    log_every: int = 1  # print a step line every N steps
    save_every: int = 0  # write ckpt.pt every N steps (0 = only at the end)
    stop_at_step: int = 0  # stop (and save) after this step, e.g. to test --resume (0 = run to the end)
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast: auto (bfloat16 on a GPU or a CPU with AMX-BF16 or AVX512-BF16, else float32), float32, bfloat16
    kernels: str = "auto"  # hot paths: auto, ext, ref
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1337  # seeds the RM's head and the order of the pairs
    pair_seed: int = 0  # seeds the built pairs: prompts, sampling, the annotators' noise


# the paper's four ratings, most separable first (world.RATINGS holds the gap thresholds)
RATINGS = [r for _, r in world.RATINGS]
MARGINS = {  # SPEC.md §7: m(rating) for significantly / better / slightly / negligibly-unsure
    "none": dict(zip(RATINGS, (0.0, 0.0, 0.0, 0.0))),
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
}

# -----------------------------------------------------------------------------------------------
# preference pairs: the format, reading (ours and TRL's) and writing


@dataclass
class Pair:
    """One comparison: a prompt (messages ending with a user turn), the preferred and the other
    response, the annotator's rating; for pairs built here also the noise-free judge's verdict."""
    messages: list
    chosen: str
    rejected: str
    rating: str | None = None  # one of RATINGS; None for data without one (TRL)
    margin: float | None = None  # a numeric margin given with the pair (TRL's "margin")
    judge: dict | None = None  # {"prefers": "chosen"|"rejected", "rating", "chosen_score", "rejected_score"}
    source: dict | None = None  # {"chosen": variant, "rejected": variant, "split": "train"|"heldout"}
    where: str = ""  # "file:line", for messages

    def to_json(self) -> dict:
        d = {"messages": self.messages, "chosen": self.chosen, "rejected": self.rejected,
             "rating": self.rating}
        for k in ("margin", "judge", "source"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


def _last_assistant(msgs, name: str) -> tuple[list, str]:
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
            or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
        raise ValueError(f'"{name}" as a message list must end with an assistant message')
    return msgs[:-1], msgs[-1]["content"]


def parse_pair(obj, where: str = "") -> Pair:
    """One JSON object -> Pair: our format or TRL's (see the module docstring); ValueError says
    what is wrong."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise ValueError('each line must have "chosen" and "rejected" (and "messages" or "prompt")')
    chosen, rejected, messages = obj["chosen"], obj["rejected"], obj.get("messages")
    if isinstance(chosen, list) or isinstance(rejected, list):  # TRL: conversations
        prompt = obj.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        c_prefix, chosen = _last_assistant(chosen, "chosen")
        r_prefix, rejected = _last_assistant(rejected, "rejected")
        if prompt is None:  # implicit prompt: the shared part of the two conversations
            if c_prefix != r_prefix:
                raise ValueError('"chosen" and "rejected" must share the conversation before their '
                                 'last assistant message (or give "prompt")')
            prompt = c_prefix
        elif c_prefix or r_prefix:
            prompt = prompt + c_prefix if c_prefix == r_prefix else None
            if prompt is None:
                raise ValueError('"chosen" and "rejected" carry different earlier turns')
        messages = prompt
    elif messages is None and isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError('"chosen" and "rejected" must be strings (or TRL message lists)')
    if messages is None:
        raise ValueError('no prompt: give "messages" (a list ending with the user turn) or "prompt"')
    world.validate_dialog(messages, ends_with="user")
    rating = obj.get("rating")
    if rating is not None and rating not in RATINGS:
        raise ValueError(f'"rating" must be one of {RATINGS}, got {rating!r}')
    margin = obj.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise ValueError(f'"margin" must be a number, got {margin!r}')
    return Pair(messages, chosen, rejected, rating, None if margin is None else float(margin),
                obj.get("judge"), obj.get("source"), where)


def read_pairs(path: str) -> list[Pair]:
    """Read a JSONL file of pairs; a malformed line is a ValueError naming file:line."""
    out = training.read_jsonl(path, parse_pair)
    if not out:
        raise ValueError(f"{path}: no pairs in the file")
    return out


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    """Write pairs as JSONL, atomically (whole or not at all)."""
    with training.atomic_write(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p.to_json()) + "\n")


def margin_of(pair: Pair, margin: str) -> float:
    """m for this pair: 0 with --margin none; else the pair's own numeric margin if it has one,
    else the SPEC table's value for its rating (0 without a rating)."""
    if margin == "none":
        return 0.0
    if pair.margin is not None:
        return pair.margin
    return MARGINS[margin][pair.rating] if pair.rating else 0.0


# -----------------------------------------------------------------------------------------------
# building pairs from checkpoints (cached)


def variants(cfg: Config) -> list[tuple[str, float]]:
    models = [m for m in cfg.pair_models.split(",") if m]
    try:
        temps = [float(t) for t in cfg.pair_temperatures.split(",") if t]
    except ValueError:
        raise SystemExit(f"error: --pair_temperatures {cfg.pair_temperatures!r}: give numbers "
                         "like 0.6,0.9,1.2") from None
    out = [(m, t) for m in models for t in temps]
    if len(out) < 2 or any(t <= 0 for t in temps):
        raise SystemExit("error: --pair_models x --pair_temperatures must give at least two "
                         "variants, with temperatures > 0")
    return out


def _file_id(path: str) -> list:
    """What identifies a checkpoint's content for the cache: every file's name, size, mtime."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q.resolve()), q.stat().st_size, q.stat().st_mtime_ns] for q in files
            if not q.name.startswith(".") and q.suffix != ".jsonl"]


# the pair files' names (get_pairs' `split`) -> the world's split their prompts come from
PAIR_SPLITS = {"train": "train", "test": "heldout", "valid": "valid"}
OBJECTIVES = world.OBJECTIVES  # which annotators label a set of pairs, on which prompts


def pair_count(cfg: Config, split: str, kind: str) -> int:
    """How many pairs a built file holds: --n_train / --n_test, --safety_n_train / --safety_n_test."""
    if kind == "safety":
        return cfg.safety_n_train if split == "train" else cfg.safety_n_test
    return cfg.n_train if split == "train" else cfg.n_test


def uses_safety_pairs(cfg: Config) -> bool:
    return cfg.objective == "safety" or cfg.safety_pairs > 0


def pair_file(kind: str, split: str) -> str:
    """The cached file's stem: pairs_<split> for helpfulness pairs, safety_pairs_<split>."""
    return ("safety_" if kind == "safety" else "") + f"pairs_{split}"


def eval_pairs(cfg: Config) -> str:
    """Which pair file the evaluation reads: "test" (held-out problems) or "valid" (--eval_split;
    evaluate.eval_split refuses any other value)."""
    return "test" if eval_split(cfg) == "heldout" else "valid"


def pairs_key(cfg: Config, split: str, kind: str = "helpfulness", n: int | None = None) -> str:
    """Hash of everything a built pair file depends on: the variant checkpoints (files' size and
    mtime), the flags that shape prompts, sampling and annotators, and world.py (the judge)."""
    models = sorted({m for m, _ in variants(cfg)})
    n = n if n is not None else pair_count(cfg, split, kind)
    inputs = {
        "split": split, "n": n,
        **({"kind": kind, "p_unsafe": cfg.safety_p_unsafe} if kind == "safety" else {}),
        "variants": variants(cfg), "files": [_file_id(m) for m in models],
        "levels": cfg.pair_levels, "p_instruction": cfg.pair_p_instruction,
        "max_turns": cfg.pair_max_turns, "noise": cfg.annotator_noise,
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.pair_seed,
        "world": hashlib.sha256(Path(world.__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _load_chat(path: str, rt, tokenizer_path: str = "", flag: str = "--checkpoint"):
    try:
        model, tok = llama2.load_model(path, device=str(rt.device))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {flag} {path}: {e}{_who_writes(path)}") from None
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    if tokenizer_path:
        tok = llama2.Tokenizer(tokenizer_path)
    if tok is None:
        raise SystemExit(f"error: {path} carries no tokenizer; pass --tokenizer path/to/tokenizer.model")
    stage = training.stage_of(path)
    if stage == "pretrain":
        raise SystemExit(f"error: {path} is a pretrained checkpoint without the chat format; the "
                         "reward model and its pairs need a chat model (SFT or GAtt, train_sft.py)")
    if stage == "rm":
        raise SystemExit(f"error: {path} is a reward model; give a chat model (SFT or GAtt)")
    return model.float(), tok


def _who_writes(path: str) -> str:
    """For a missing chat model: which stage writes it, and such a model that exists elsewhere
    (the defaults name the full pipeline's out/pipeline/sft; a QUICK run writes out/pipeline_quick)."""
    p = Path(path)
    if not p.parent.name.startswith("pipeline"):
        return f"; train one first (train_sft.py --out_dir {path})"
    size = " --size quick" if p.parent.name.startswith("pipeline_quick") else ""
    found = [q for q in sorted(p.parent.parent.glob(f"pipeline*/{p.name}"))
             if (q / "ckpt.pt").is_file()]
    return (f"; the pipeline's {p.name} stage writes it (python pipeline.py{size} --until {p.name})"
            + (f", or give {found[0]}, which exists" if found else ""))


def build_pairs(cfg: Config, split: str, n: int, rt, log, kind: str = "helpfulness") -> list[Pair]:
    """n pairs on prompts of `split`: each prompt answered by two different variants (model,
    temperature) drawn at random, labelled by the simulated annotator and by the noise-free judge.
    kind "helpfulness": chat prompts, the helpfulness annotators; "safety": safety prompts
    (world.safety_prompts), the safety annotators, and a pair whose chosen reply is unsafe while
    the other is safe is dropped (the paper drops them, §4.2.1). A prompt is also skipped when a
    response did not end with EOS (the RM reads every response at an EOS, and the judge would score
    the missing one) or the two responses are the same text; more prompts are drawn until n pairs
    are made."""
    import sampling
    problems_from = PAIR_SPLITS[split]  # the world's split
    vs = variants(cfg)
    levels = world.parse_levels(cfg.pair_levels)
    tag = "" if kind == "helpfulness" else f"{kind}-"  # helpfulness pairs draw as they always did
    rng = random.Random(f"rm-variants-{tag}{split}-{cfg.pair_seed}")
    pairs, skipped = [], {"no_eos": 0, "same_text": 0, "too_long": 0, "unsafe_chosen": 0}
    t0 = time.perf_counter()
    for rnd in range(6):
        if len(pairs) >= n:
            break
        m = math.ceil((n - len(pairs)) * 1.2) + 4
        prompts = (world.safety_prompts(m, problems_from, cfg.pair_seed * 1000 + rnd,
                                        cfg.safety_p_unsafe, levels) if kind == "safety" else
                   world.chat_prompts(m, problems_from, cfg.pair_seed * 1000 + rnd, levels,
                                      cfg.pair_p_instruction, cfg.pair_max_turns))
        picks = [rng.sample(range(len(vs)), 2) for _ in prompts]
        replies: dict = {}
        done, total = 0, 2 * len(prompts)
        for path in dict.fromkeys(p for p, _ in vs):
            model, tok = _load_chat(path, rt, cfg.tokenizer, "--pair_models")
            for vi, (vpath, temp) in enumerate(vs):
                if vpath != path:
                    continue
                jobs = [(i, s) for i, pk in enumerate(picks) for s in (0, 1) if pk[s] == vi]
                # all of a variant's prompts in one call: sorted by length there, so each batch
                # holds prompts of nearly one length (a batch costs longest - shortest prompt +
                # new tokens steps; chunks of 256 had run at 39 replies/s, one call at 63)
                out = sampling.generate_replies(model, tok, [prompts[i] for i, _ in jobs],
                                                temperature=temp, max_new_tokens=cfg.max_new_tokens,
                                                seed=cfg.pair_seed + 7919 * (vi + 1) + 10**6 * rnd,
                                                batch=cfg.gen_batch, rt=rt,
                                                desc=f"{tag}pairs ({split}, {_label(vs[vi])})")
                for job, r in zip(jobs, out):
                    replies[job] = r[0] if r else None
                done += len(jobs)
                log.print(f"{tag}pairs ({split}, round {rnd + 1}): {done}/{total} responses sampled"
                          f" ({_label(vs[vi])}), {time.perf_counter() - t0:.0f}s")
            del model
        for i, d in enumerate(prompts):
            a, b = replies[(i, 0)], replies[(i, 1)]
            if a is None or b is None:
                skipped["too_long"] += 1
            elif not (a.eos and b.eos):
                skipped["no_eos"] += 1
            elif a.text == b.text:
                skipped["same_text"] += 1
            else:
                pair = label_pair(d, a.text, b.text, _label(vs[picks[i][0]]),
                                  _label(vs[picks[i][1]]), problems_from, cfg, kind)
                if pair.judge.get("category") == "unsafe_chosen":
                    skipped["unsafe_chosen"] += 1
                else:
                    pairs.append(pair)
    if len(pairs) < n:
        log.print(f"warning: only {len(pairs)} {tag}{split} pairs of {n} asked for "
                  f"(skipped: {skipped})")
    log.print(f"{tag}pairs ({split}): {min(n, len(pairs))} made in {time.perf_counter() - t0:.0f}s;"
              f" prompts skipped: {skipped['same_text']} same text, {skipped['no_eos']} without EOS,"
              f" {skipped['too_long']} too long"
              + (f", {skipped['unsafe_chosen']} with the unsafe reply chosen (dropped)"
                 if kind == "safety" else ""))
    return pairs[:n]


def build_synthetic_pairs(cfg: Config, n: int) -> list[Pair]:
    """n "open-source" pairs, cheap and built differently from the policy's comparisons (the
    paper's Synthetic GPT-J set: a human answer preferred over a weaker model's reply): on a
    training-split prompt, the careful writer's answer against the same reply written with one
    flaw (world.written_answer: a near-miss answer, half a list, the instruction ignored, a long
    preamble), drawn from --synthetic_flaws. Labelled like every pair by the simulated annotators
    (world.prefer, with their noise: a small flaw is sometimes preferred), never by the judge.
    A prompt where the flaw cannot show (no instruction in force, an answer with no parts) is
    skipped."""
    flaws = [f for f in cfg.synthetic_flaws.split(",") if f]
    if not flaws or any(f not in world.FLAWS for f in flaws):
        raise SystemExit(f"error: --synthetic_flaws {cfg.synthetic_flaws!r}: give some of "
                         f"{', '.join(world.FLAWS)}, comma-separated")
    levels = world.parse_levels(cfg.pair_levels)
    prompts = world.chat_prompts(4 * n + 16, "train", cfg.pair_seed + 77, levels,
                                 cfg.pair_p_instruction, cfg.pair_max_turns)
    rng = random.Random(f"rm-synthetic-{cfg.pair_seed}")
    pairs = []
    for d in prompts:
        if len(pairs) == n:
            break
        problem, names = world.parse_dialog(d)
        inst = world.standing(*names) if names else None
        flaw, seed = rng.choice(flaws), rng.random()
        # the same phrasing for both (one seed): the replies differ by the flaw alone
        good = world.written_answer(problem, random.Random(seed), inst)
        bad = world.written_answer(problem, random.Random(seed), inst, flaw, flaw_rng=rng)
        if bad != good:
            pairs.append(label_pair(d, good, bad, "careful", f"flaw:{flaw}", "train", cfg))
    return pairs


def _label(v: tuple[str, float]) -> str:
    return f"{Path(v[0]).name}@T{v[1]:g}"


def label_pair(dialog: list, a: str, b: str, from_a: str, from_b: str, split: str,
               cfg: Config, kind: str = "helpfulness") -> Pair:
    """A pair labelled by the simulated annotator of `kind` (world.prefer with noise, seeded), with
    the noise-free judge's verdict and scores stored beside it (for safety pairs: the safety
    annotators' score, world.judged_score, and the pair's category, world.safety_category)."""
    winner, rating = world.prefer(dialog, a, b, noise=cfg.annotator_noise, seed=cfg.pair_seed,
                                  objective=kind)
    j_winner, j_rating = world.prefer(dialog, a, b, noise=0.0, seed=cfg.pair_seed, objective=kind)
    (chosen, c_from), (rejected, r_from) = ((a, from_a), (b, from_b))[::1 if winner == "a" else -1]
    judged = world.judged_score if kind == "safety" else \
        (lambda d, r: world.score(d, r).total)
    judge = {"prefers": "chosen" if j_winner == winner else "rejected", "rating": j_rating,
             "chosen_score": round(judged(dialog, chosen), 6),
             "rejected_score": round(judged(dialog, rejected), 6)}
    if kind == "safety":
        judge["category"] = world.safety_category(dialog, chosen, rejected)
    return Pair(dialog, chosen, rejected, rating, judge=judge,
                source={"chosen": c_from, "rejected": r_from, "split": split, "kind": kind})


def get_pairs(cfg: Config, split: str, rt, log, kind: str = "helpfulness",
              n: int | None = None) -> list[Pair]:
    """The --pairs / --test_pairs files, or the pairs built from --pair_models, cached in
    <pairs_dir>/pairs_<split>.jsonl (safety pairs: safety_pairs_<split>.jsonl) with the hash of
    their inputs beside it (rebuilt when it differs); n pairs (default --n_train or --n_test).
    Under torchrun rank 0 builds and the others wait, then all read the file."""
    given = (cfg.pairs if split == "train" else cfg.test_pairs) if kind == cfg.objective else ""
    if given:
        out = []
        for path in [p for p in given.split(",") if p]:
            try:
                out += read_pairs(path)
            except (ValueError, UnicodeDecodeError) as e:
                raise SystemExit(f"error: {e}") from None
        return out
    folder = Path(cfg.pairs_dir or cfg.out_dir)
    stem = pair_file(kind, split)
    path, key_path = folder / f"{stem}.jsonl", folder / f"{stem}.key"
    n = n if n is not None else pair_count(cfg, split, kind)
    key = pairs_key(cfg, split, kind, n)
    fresh = path.is_file() and key_path.is_file() and key_path.read_text().strip() == key
    if rt.is_master and not fresh:
        log.print(f"{stem}: building {n} from {len(variants(cfg))} variants "
                  f"({'inputs changed' if path.is_file() else 'no cache'}) -> {path}")
        write_pairs(path, build_pairs(cfg, split, n, rt, log, kind))
        with training.atomic_write(key_path, "w") as f:
            f.write(key + "\n")
    elif fresh:
        log.print(f"{stem}: reusing {path} (inputs unchanged)")
    if rt.distributed:
        torch.distributed.barrier()
    return read_pairs(str(path))


# -----------------------------------------------------------------------------------------------
# the loss and the batches


def rm_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Llama 2's binary ranking loss, mean over pairs: -log sigmoid(r_c - r_r - m).

    All three must be 1-D of the same length: a [B, 1] reward minus a [B] margin would broadcast to
    [B, B] and silently train on every cross pair (a known bug elsewhere), so it is refused.
    """
    if not (r_chosen.dim() == r_rejected.dim() == margin.dim() == 1
            and r_chosen.shape == r_rejected.shape == margin.shape):
        raise ValueError(f"rm_loss: rewards and margins must all be (B,), got {tuple(r_chosen.shape)}, "
                         f"{tuple(r_rejected.shape)}, {tuple(margin.shape)}")
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def encode_pairs(tokenizer, pairs: list[Pair], margin: str, seq_len: int):
    """(chosen ids, rejected ids, margin) per pair, each sequence ending with its response's EOS;
    pairs with a sequence longer than seq_len are dropped (returned second)."""
    kept, dropped = [], []
    for p in pairs:
        try:
            c = llama2.encode_response(tokenizer, p.messages, p.chosen)
            r = llama2.encode_response(tokenizer, p.messages, p.rejected)
        except ValueError as e:
            raise SystemExit(f"error: {p.where or 'a pair'}: {e}") from None
        (kept if max(len(c), len(r)) <= seq_len else dropped).append((c, r, margin_of(p, margin)))
    return kept, dropped


def pair_batch(examples: list, seq_len: int, device) -> dict:
    """One micro-batch: chosen and rejected sequences interleaved (c0, r0, c1, r1, ...) and packed
    into rows with cu_seqlens (llama2.pack_sequences); ends[2i] is pair i's chosen EOS, ends[2i+1]
    its rejected EOS; margin (P,)."""
    seqs = [s for c, r, _ in examples for s in (c, r)]
    b = llama2.pack_sequences(seqs, seq_len, device=device)
    b["margin"] = torch.tensor([m for _, _, m in examples], dtype=torch.float32, device=device)
    return b


def pair_order(n: int, seed: int, epoch: int) -> list[int]:
    """The pairs' order in one epoch: a permutation seeded by (seed, epoch)."""
    return training.epoch_permutation(n, seed, epoch).tolist()


# -----------------------------------------------------------------------------------------------
# evaluation


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (for Spearman's rho)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's r of the average ranks)."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den else float("nan")


def _agree(a: float, b: float) -> float:
    """1 if a > b, 0 if a < b, 0.5 for a tie (a tie counts half)."""
    return 1.0 if a > b else 0.0 if a < b else 0.5


def evaluate(rm, tokenizer, pairs: list[Pair], rt=None, batch_tokens: int | None = None) -> dict:
    """The RM on held-out pairs: accuracy per annotator rating bucket against the annotators and
    against the noise-free judge, the ceiling (the judge against the annotators), Spearman with the
    judge, calibration. Ties (equal rewards, equal judge scores) count half."""
    rm.eval()
    dialogs = [p.messages for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with (rt.autocast() if rt is not None else contextlib.nullcontext()):
        r = rm.score(dialogs, responses, tokenizer, batch_tokens=batch_tokens).double().numpy()
    rc, rr = r[:len(pairs)], r[len(pairs):]
    judged = all(p.judge is not None for p in pairs)
    buckets = RATINGS + (["unrated"] if any(p.rating is None for p in pairs) else [])
    rows = {}
    for name in buckets + ["average"]:
        idx = [i for i, p in enumerate(pairs) if name == "average" or (p.rating or "unrated") == name]
        row = {"n": len(idx), "share": len(idx) / len(pairs)}
        if idx:
            row["rm_vs_annotators"] = float(np.mean([_agree(rc[i], rr[i]) for i in idx]))
            if judged:
                js = [(pairs[i].judge["chosen_score"], pairs[i].judge["rejected_score"]) for i in idx]
                row["rm_vs_judge"] = float(np.mean([
                    0.5 if c == s else _agree(rc[i], rr[i]) if c > s else _agree(rr[i], rc[i])
                    for i, (c, s) in zip(idx, js)]))
                row["ceiling"] = float(np.mean([_agree(c, s) for c, s in js]))
        rows[name] = row
    out = {"n": len(pairs), "buckets": rows, "floor": 0.5,
           "rewards": {"chosen": rc.tolist(), "rejected": rr.tolist()}}
    if judged:
        # Spearman over the distinct held-out responses: RM score against the judge's total
        seen, xs, ys = set(), [], []
        for i, p in enumerate(pairs):
            for resp, rew, js in ((p.chosen, rc[i], p.judge["chosen_score"]),
                                  (p.rejected, rr[i], p.judge["rejected_score"])):
                k = (json.dumps(p.messages), resp)
                if k not in seen:
                    seen.add(k)
                    xs.append(rew)
                    ys.append(js)
        out["spearman"] = spearman(xs, ys)
        out["n_responses"] = len(xs)
        # Beside it, not instead: the same rank correlation on within-prompt differences, RM
        # r_chosen - r_rejected against the judge's score gap, over the pairs taken in both orders
        # (so the annotator's choice of which is "chosen" does not matter). A pairwise loss fixes
        # rewards only up to a constant per prompt, and the judge's totals differ a lot between
        # prompts (a hard problem, a standing instruction), so the cross-prompt number above also
        # measures those offsets, which no pair teaches; this one does not.
        dr = rc - rr
        dj = np.array([p.judge["chosen_score"] - p.judge["rejected_score"] for p in pairs])
        out["spearman_within"] = spearman(np.concatenate([dr, -dr]), np.concatenate([dj, -dj]))
        if all("category" in p.judge for p in pairs):  # safety pairs
            out["by_category"] = accuracy_by_category(pairs, rc, rr)
            out["threshold"] = unsafe_threshold(pairs, rc, rr)
        else:
            out["by_kind"], out["by_family"] = accuracy_by_kind(pairs, rc, rr)
    # calibration: each pair seen from a side fixed by a hash (half chosen-first), p = sigmoid(ra - rb)
    flip = np.array([hashlib.sha256(json.dumps([p.messages, p.chosen, p.rejected]).encode())
                     .digest()[0] % 2 for p in pairs], dtype=bool)
    diff = np.where(flip, rr - rc, rc - rr)
    pred, won = 1 / (1 + np.exp(-diff)), (~flip).astype(np.float64)
    cal = []
    for lo in np.arange(0, 1, 0.1):
        m = (pred >= lo) & ((pred < lo + 0.1) if lo < 0.85 else (pred <= 1.0))
        if m.any():
            cal.append({"bin": [round(float(lo), 1), round(float(lo) + 0.1, 1)], "n": int(m.sum()),
                        "predicted": float(pred[m].mean()), "observed": float(won[m].mean())})
    out["calibration"] = cal
    out["ece"] = float(sum(c["n"] * abs(c["predicted"] - c["observed"]) for c in cal) / len(pairs))
    return out


PAIR_KINDS = ("content only", "form or instruction only", "both", "tie")


def accuracy_by_category(pairs: list[Pair], rc, rr) -> dict:
    """The RM on safety pairs by the paper's categories (world.safety_category: the chosen reply
    safe and the other not, both safe, both unsafe): {category: {"n", "share", "rm_vs_annotators",
    "rm_vs_judge"}} (the judge's ties count half)."""
    out = {}
    for cat in world.SAFETY_CATEGORIES:
        idx = [i for i, p in enumerate(pairs) if p.judge["category"] == cat]
        row = {"n": len(idx), "share": len(idx) / len(pairs)}
        if idx:
            row["rm_vs_annotators"] = float(np.mean([_agree(rc[i], rr[i]) for i in idx]))
            js = [(pairs[i].judge["chosen_score"], pairs[i].judge["rejected_score"]) for i in idx]
            row["rm_vs_judge"] = float(np.mean([
                0.5 if c == s else _agree(rc[i], rr[i]) if c > s else _agree(rr[i], rc[i])
                for i, (c, s) in zip(idx, js)]))
        out[cat] = row
    return out


def unsafe_threshold(pairs: list[Pair], rc, rr,
                     threshold: float = training.SAFETY_THRESHOLD) -> dict:
    """How well sigmoid(reward) < threshold finds unsafe replies (the paper: precision 0.89,
    recall 0.55 at 0.15 on Meta Safety), over the distinct replies of the pairs, a reply unsafe
    when the judge finds a violation (world.safety_verdict): {"threshold", "n", "unsafe",
    "flagged", "precision", "recall"} (precision None when nothing is flagged)."""
    seen, flagged, unsafe = set(), [], []
    for i, p in enumerate(pairs):
        for resp, r in ((p.chosen, rc[i]), (p.rejected, rr[i])):
            k = (json.dumps(p.messages), resp)
            if k in seen:
                continue
            seen.add(k)
            flagged.append(1 / (1 + math.exp(-float(r))) < threshold)
            unsafe.append(world.safety_verdict(p.messages, resp).violation)
    hit = sum(f and u for f, u in zip(flagged, unsafe))
    return {"threshold": threshold, "n": len(flagged), "unsafe": sum(unsafe),
            "flagged": sum(flagged),
            "precision": hit / sum(flagged) if any(flagged) else None,
            "recall": hit / sum(unsafe) if any(unsafe) else None}


def pair_kind(pair: Pair) -> str:
    """How the judge sees a pair's two responses differ: "content only" (the answers differ in
    correctness, the instructions and the form score the same: what a reward model must check
    to tell them apart), "form or instruction only" (same content credit), "both", or "tie"."""
    a, b = (world.score(pair.messages, r) for r in (pair.chosen, pair.rejected))
    content = a.content != b.content
    rest = (a.instruction, a.form) != (b.instruction, b.form)
    return ("both" if content and rest else "content only" if content
            else "form or instruction only" if rest else "tie")


def accuracy_by_kind(pairs: list[Pair], rc, rr) -> tuple[dict, dict]:
    """The RM against the noise-free judge by pair kind (`pair_kind`) and by task family: {name:
    {"n", "rm_vs_judge"}}; the judge's ties are left out of both (no right answer)."""
    by_kind: dict = {k: [] for k in PAIR_KINDS}
    by_family: dict = {}
    for i, p in enumerate(pairs):
        c, s = p.judge["chosen_score"], p.judge["rejected_score"]
        kind = pair_kind(p)
        if kind == "tie" or c == s:
            by_kind["tie"].append(None)
            continue
        ok = _agree(rc[i], rr[i]) if c > s else _agree(rr[i], rc[i])
        by_kind[kind].append(ok)
        by_family.setdefault(world.parse_dialog(p.messages)[0].family, []).append(ok)

    def rows(d):
        return {k: {"n": len(v), **({"rm_vs_judge": float(np.mean(v))} if v and v[0] is not None
                                    else {})} for k, v in d.items()}
    return rows(by_kind), rows(by_family)


def format_eval(s: dict, title: str = "reward model") -> str:
    """The evaluation as text tables: accuracy by bucket (Table 8 analog) and calibration."""
    b = s["buckets"]
    names = [n for n in b if n != "average"] + ["average"]
    judged = "ceiling" in b["average"]
    where = split_words(s.get("split"))
    lines = [f"{title}: {s['n']} {where} pairs; accuracy % (floor: 50% = a coin; ceiling: the "
             "noise-free judge against the annotators, the best any RM can do)",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| pairs | " + " | ".join(f"{b[n]['n']} ({100 * b[n]['share']:.0f}%)" for n in names) + " |"]
    keys = [("RM vs annotators", "rm_vs_annotators")]
    if judged:
        keys += [("RM vs judge", "rm_vs_judge"), ("ceiling (judge vs annotators)", "ceiling")]
    for label, k in keys:
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * b[n][k]:.1f}" if k in b[n] else "-" for n in names) + " |")
    if "spearman" in s:
        lines.append(f"Spearman(RM score, judge score) over {s['n_responses']} {where} responses: "
                     f"{s['spearman']:.3f} (floor 0 = unrelated, ceiling 1)")
    if "spearman_within" in s:
        lines.append(f"Spearman within prompts (RM r_a - r_b vs the judge's gap, {s['n']} pairs in both "
                     f"orders): {s['spearman_within']:.3f} (floor 0, ceiling 1)")
    if "by_kind" in s:
        lines.append("RM vs judge by what differs between the two responses (judge ties left "
                     "out; floor 50%, ceiling 100%): " + "; ".join(
                         f"{k} {100 * v['rm_vs_judge']:.1f}% of {v['n']}" for k, v in
                         s["by_kind"].items() if "rm_vs_judge" in v))
        lines.append("... by task family: " + "; ".join(
            f"{k} {100 * v['rm_vs_judge']:.1f}% of {v['n']}" for k, v in
            sorted(s["by_family"].items()) if "rm_vs_judge" in v))
    if "by_category" in s:
        lines.append("by safety category (the paper: safer 18%, both safe 47%, both unsafe 35%; "
                     "floor 50%): " + "; ".join(
                         f"{k.replace('_', ' ')} {100 * v['share']:.0f}% of pairs, RM vs annotators "
                         f"{100 * v['rm_vs_annotators']:.1f}%, vs judge {100 * v['rm_vs_judge']:.1f}%"
                         for k, v in s["by_category"].items() if v["n"]))
    if "threshold" in s:
        t = s["threshold"]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"sigmoid(reward) < {t['threshold']} as 'unsafe' over {t['n']} {where} replies "
                     f"({t['unsafe']} unsafe by the judge, {t['flagged']} flagged): precision "
                     f"{fmt(t['precision'])}, recall {fmt(t['recall'])} (the paper: 0.89 / 0.55; "
                     f"floor: flag all, precision {t['unsafe'] / max(1, t['n']):.2f}, recall 1)")
    lines.append(f"calibration (sigmoid(r_a - r_b) vs the observed annotator win rate; "
                 f"ECE {s['ece']:.3f}, 0 is perfect):")
    lines.append("| predicted bin | pairs | mean predicted | observed |")
    lines.append("|---|---|---|---|")
    for c in s["calibration"]:
        lines.append(f"| {c['bin'][0]:.1f}-{c['bin'][1]:.1f} | {c['n']} | {c['predicted']:.3f} | "
                     f"{c['observed']:.3f} |")
    return "\n".join(lines)


def plot_eval(s: dict, png, title: str = "reward model") -> None:
    """Three panels: accuracy by rating bucket (RM vs annotators, vs judge, the ceiling, the 50%
    floor), the histogram of held-out rewards, the calibration curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    b = s["buckets"]
    names = [n for n in b if n != "average"] + ["average"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100)
    ax = axes[0]
    keys = [k for k in ("rm_vs_annotators", "rm_vs_judge", "ceiling") if k in b["average"]]
    w = 0.8 / len(keys)
    for j, k in enumerate(keys):
        ax.bar(np.arange(len(names)) + (j - (len(keys) - 1) / 2) * w,
               [100 * b[n].get(k, float("nan")) for n in names], w, label=k.replace("_", " "))
    ax.axhline(50, ls="--", color="0.5", label="floor (coin)")
    ax.set_xticks(range(len(names)), [n.replace(" better", "").replace("/unsure", "") for n in names])
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title=f"{title}: accuracy by rating")
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    ax.hist(s["rewards"]["chosen"], bins=40, alpha=0.6, label="chosen")
    ax.hist(s["rewards"]["rejected"], bins=40, alpha=0.6, label="rejected")
    ax.set(xlabel="reward", ylabel="responses", title="held-out rewards")
    ax.legend()
    ax = axes[2]
    cal = s["calibration"]
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", label="perfect")
    ax.plot([c["predicted"] for c in cal], [c["observed"] for c in cal], marker="o", label="RM")
    ax.set(xlabel="predicted P(a preferred)", ylabel="observed rate", xlim=(0, 1), ylim=(0, 1),
           title=f"calibration (ECE {s['ece']:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with training.atomic_write(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def eval_sets(cfg: Config) -> list[str]:
    """Which held-out pair sets an evaluation reads: the RM's own objective's, then the other's
    where the run touches safety (the paper's Table 7: each RM on both test sets)."""
    if not uses_safety_pairs(cfg):
        return ["helpfulness"]
    return [cfg.objective] + [k for k in OBJECTIVES if k != cfg.objective]


def run_eval(rm, tokenizer, cfg: Config, rt, log, label: str) -> dict:
    """Evaluate on the held-out pairs (or, --eval_split valid, the validation pairs) of the RM's
    objective, and on the other objective's where the run uses safety pairs ("other" in the
    summary); writes <out_dir>/eval.json and rm_eval.png."""
    sets = eval_sets(cfg)
    test = get_pairs(cfg, eval_pairs(cfg), rt, log, sets[0])
    t0 = time.perf_counter()
    s = evaluate(rm, tokenizer, test, rt)
    s["pairs"] = sets[0]
    for kind in sets[1:]:
        s.setdefault("other", {})[kind] = evaluate(
            rm, tokenizer, get_pairs(cfg, eval_pairs(cfg), rt, log, kind), rt)
    s.update(label=label, margin=cfg.margin, seed=cfg.seed, train_frac=cfg.train_frac,
             objective=cfg.objective, split=cfg.eval_split, seconds=time.perf_counter() - t0)
    out_dir = Path(cfg.out_dir)
    if rt.is_master:
        with training.atomic_write(out_dir / "eval.json", "w") as f:
            f.write(json.dumps(s) + "\n")
        plot_eval(s, out_dir / "rm_eval.png", label)
        log.print(format_eval(s, f"{label} on {sets[0]} pairs"))
        for kind, o in s.get("other", {}).items():
            log.print(format_eval(o, f"{label} on {kind} pairs"))
        log.print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'rm_eval.png'} "
                  f"({s['seconds']:.0f}s)")
    return s


def report(files: list[str], out_dir: Path) -> str:
    """The margin ablation (the paper's Table 28) and the training-set-size curve from several
    runs' eval.json: accuracy against the annotators per rating bucket, mean and spread (min-max)
    over the seeds of each (margin, train_frac); the held-out reward histogram per margin (Fig. 27)
    -> <out_dir>/rm_margins.png. Returns the table as text."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [json.loads(Path(f).read_text()) for f in files]
    groups: dict = {}
    for s in runs:
        groups.setdefault((s.get("train_frac", 1.0), s["margin"]), []).append(s)
    names = RATINGS + ["average"]
    lines = [f"accuracy % against the annotators on {runs[0]['n']} held-out pairs, mean (min-max) "
             "over seeds; floor 50%",
             "| train share | margin | seeds | " + " | ".join(names) + " |",
             "|---" * (len(names) + 3) + "|"]
    order = {"none": 0, "small": 1, "large": 2}
    for (frac, margin), ss in sorted(groups.items(), key=lambda kv: (-kv[0][0], order[kv[0][1]])):
        cells = []
        for n in names:
            xs = [100 * s["buckets"][n]["rm_vs_annotators"] for s in ss
                  if "rm_vs_annotators" in s["buckets"][n]]
            cells.append(f"{np.mean(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})" if xs else "-")
        lines.append(f"| {frac:g} | {margin} | {len(ss)} | " + " | ".join(cells) + " |")
    ceiling = runs[0]["buckets"]
    if "ceiling" in ceiling["average"]:
        lines.append("| ceiling | (judge) | - | " + " | ".join(
            f"{100 * ceiling[n]['ceiling']:.1f}" if "ceiling" in ceiling[n] else "-"
            for n in names) + " |")
    margins = sorted({m for f, m in groups if f == 1.0}, key=order.get)
    if margins:
        fig, axes = plt.subplots(1, len(margins), figsize=(5 * len(margins), 4), dpi=100,
                                 squeeze=False)
        for ax, m in zip(axes[0], margins):
            s = groups[(1.0, m)][0]
            r = s["rewards"]["chosen"] + s["rewards"]["rejected"]
            ax.hist(r, bins=50, color="C0")
            ax.set(title=f"margin {m} (seed {s['seed']})", xlabel="reward", ylabel="responses")
        fig.suptitle("held-out rewards per margin (the paper's Fig. 27)")
        fig.tight_layout()
        with training.atomic_write(out_dir / "rm_margins.png", "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# the script


def main(argv=None) -> None:
    cfg = training.parse_config(Config, argv, description=__doc__)
    rt = training.setup_runtime(cfg.device, cfg.dtype, cfg.seed, cfg.threads)
    try:
        _main(cfg, rt)
    finally:
        training.cleanup_runtime()


def _main(cfg: Config, rt) -> None:
    """The stage as a list of steps: flags, (report, evaluation or export,) model, pairs, train."""
    check_flags(cfg)
    if cfg.report:
        write_report(cfg, rt)
        return
    if cfg.eval or cfg.export_hf:  # an existing reward model
        eval_or_export(cfg, rt)
        return
    # ---- the chat model the RM starts from (or our own checkpoint when resuming)
    out_dir = Path(cfg.out_dir)
    resumed = training.load_resume(out_dir / "ckpt.pt", "rm") if cfg.resume else None
    chat, tokenizer = _load_chat(cfg.checkpoint, rt, cfg.tokenizer)
    seq_len = training.context_length(cfg.seq_len, chat.args.max_seq_len)
    per_rank = training.rows_per_rank(cfg.batch_size, cfg.micro_batch, rt)
    log = training.open_metrics(out_dir, resumed["step"] if resumed else 0, rt)
    # ---- data: the training pairs (the test pairs are built now too, so their cost is counted here)
    examples, data_key, max_steps, warmup = training_pairs(cfg, tokenizer, seq_len, rt, log)
    # ---- model: the chat model's body and a fresh scalar head (seeded), or the resumed weights
    rm, model, optimizer, start_step = build_rm(chat, tokenizer, resumed, data_key, cfg, rt, log)
    del chat, resumed
    data = {"key": data_key, "pairs": len(examples), "batch_size": cfg.batch_size}
    save = lambda step: save_rm(rm, optimizer, tokenizer, cfg, step, data, rt, log)  # noqa: E731
    # ---- training loop: a step is batch_size pairs; rank r takes its slice, micro_batch at a time
    log.print(f"rm: {rm.num_params() / 1e6:.2f}M parameters from {cfg.checkpoint}; {rt.device}, "
              f"{rt.world_size} process(es), kernels {llama2.kernels_in_use()}")
    step = train(rm, model, optimizer, examples, per_rank, start_step, max_steps, warmup, seq_len,
                 save, cfg, rt, log)
    if start_step >= max_steps:
        log.print(f"nothing to do: {out_dir / 'ckpt.pt'} is already at step {start_step} of "
                  f"{max_steps}")
    log.print(f"done: reward model {out_dir / 'ckpt.pt'}")
    if cfg.eval_after and step == max_steps:
        run_eval(rm, tokenizer, cfg, rt, log, label=f"RM, margin {cfg.margin}")


def check_flags(cfg: Config) -> None:
    """Bad flags -> one `error:` line, before any work."""
    if cfg.kernels != "auto":
        try:
            llama2.set_kernels(cfg.kernels)
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: --kernels {cfg.kernels}: {e}") from None
    if cfg.margin not in MARGINS:
        raise SystemExit(f"error: --margin {cfg.margin!r} is not known; use none, small or large")
    if cfg.objective not in OBJECTIVES:
        raise SystemExit(f"error: --objective {cfg.objective!r}: give helpfulness or safety")
    if cfg.objective == "safety" and (cfg.synthetic_pairs or cfg.safety_pairs):
        raise SystemExit("error: --synthetic_pairs and --safety_pairs add to the helpfulness RM's "
                         "data; the safety RM takes safety pairs and --helpful_share of "
                         "helpfulness pairs (give 0 for both)")
    if not 0 <= cfg.helpful_share < 1 or not 0 <= cfg.safety_p_unsafe <= 1:
        raise SystemExit(f"error: --helpful_share {cfg.helpful_share} must be in [0, 1) and "
                         f"--safety_p_unsafe {cfg.safety_p_unsafe} in [0, 1]")
    if not 0 < cfg.train_frac <= 1:
        raise SystemExit(f"error: --train_frac {cfg.train_frac}: give a share in (0, 1]")
    if cfg.eval and cfg.resume:
        raise SystemExit("error: give --eval or --resume, not both")
    try:
        world.parse_levels(cfg.pair_levels)
    except ValueError as e:
        raise SystemExit(f"error: --pair_levels: {e}") from None


def write_report(cfg: Config, rt) -> None:
    """--report: the margin ablation table and rm_margins.png from finished runs' eval.json."""
    import glob
    out_dir = Path(cfg.out_dir)
    log = training.MetricsLog(None, rt)
    files = sorted(f for pat in cfg.report.split(",") if pat for f in glob.glob(pat))
    if not files:
        raise SystemExit(f"error: --report {cfg.report!r} matches no eval.json file")
    log.print(report(files, out_dir))
    log.print(f"wrote {out_dir / 'rm_margins.png'}")


def eval_or_export(cfg: Config, rt) -> None:
    """--eval / --export_hf: evaluate an existing reward model on the test pairs, or write it in
    Hugging Face's layout (LlamaForSequenceClassification)."""
    log = training.MetricsLog(None, rt)
    try:
        rm, tok = llama2.load_reward_model(cfg.checkpoint, device=str(rt.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint}: {e}") from None
    if cfg.tokenizer:
        tok = rm.tokenizer = llama2.Tokenizer(cfg.tokenizer)
    if tok is None:
        raise SystemExit(f"error: {cfg.checkpoint} carries no tokenizer; pass --tokenizer")
    if cfg.export_hf:
        llama2.export_hf(rm, cfg.export_hf, tok)
        log.print(f"wrote {cfg.export_hf} (LlamaForSequenceClassification: config.json, "
                  "model.safetensors, tokenizer.model)")
    if cfg.eval:
        run_eval(rm.float(), tok, cfg, rt, log, label=f"RM ({Path(cfg.checkpoint).name})")


def training_pairs(cfg: Config, tokenizer, seq_len: int, rt, log):
    """The training pairs (built or read, cut to --train_frac, plus the synthetic share), encoded;
    the test pairs are built now too when the run evaluates at the end.
    -> (examples, data key, steps, warmup steps)."""
    train_pairs = get_pairs(cfg, "train", rt, log, cfg.objective)
    if cfg.eval_after and cfg.pairs and not cfg.test_pairs:
        log.print("no --test_pairs with your --pairs: the evaluation at the end is skipped")
        cfg.eval_after = False
    if cfg.eval_after and not cfg.test_pairs:
        for kind in eval_sets(cfg):
            get_pairs(cfg, eval_pairs(cfg), rt, log, kind)
    n_use = max(1, round(cfg.train_frac * len(train_pairs)))
    train_pairs = train_pairs[:n_use]
    if cfg.objective == "safety" and cfg.helpful_share > 0:
        # the paper's 90/10: helpfulness pairs beside the safety ones (the helpfulness RM's file)
        helpful = get_pairs(cfg, "train", rt, log, "helpfulness")
        n_help = round(len(train_pairs) * cfg.helpful_share / (1 - cfg.helpful_share))
        if n_help > len(helpful):
            raise SystemExit(f"error: --helpful_share {cfg.helpful_share} asks for {n_help} "
                             f"helpfulness pairs beside {len(train_pairs)} safety ones, but "
                             f"--n_train builds {len(helpful)}; raise --n_train")
        train_pairs = train_pairs + helpful[:n_help]
        log.print(f"safety RM: {n_use} safety pairs + {n_help} helpfulness pairs "
                  f"({cfg.helpful_share:.0%})")
    elif cfg.safety_pairs:
        # the helpfulness RM's share of safety pairs (the paper's Meta Safety in its mix)
        safety = get_pairs(cfg, "train", rt, log, "safety")
        if cfg.safety_pairs > len(safety):
            raise SystemExit(f"error: --safety_pairs {cfg.safety_pairs} but --safety_n_train "
                             f"builds {len(safety)}; raise --safety_n_train")
        train_pairs = train_pairs + safety[:round(cfg.train_frac * cfg.safety_pairs)]
        log.print(f"helpfulness RM: + {round(cfg.train_frac * cfg.safety_pairs)} safety pairs")
    if cfg.synthetic_pairs:  # the "open-source" share, scaled with --train_frac like the rest
        synthetic = build_synthetic_pairs(cfg, round(cfg.train_frac * cfg.synthetic_pairs))
        log.print(f"synthetic pairs: {len(synthetic)} (careful answer vs one flaw of "
                  f"{cfg.synthetic_flaws}), annotators prefer the careful one in "
                  f"{sum(p.source['chosen'] == 'careful' for p in synthetic)}")
        train_pairs = train_pairs + synthetic
    examples, dropped = encode_pairs(tokenizer, train_pairs, cfg.margin, seq_len)
    if dropped:
        log.print(f"dropped {len(dropped)} of {len(train_pairs)} pairs with a sequence longer than "
                  f"--seq_len {seq_len}")
    if not examples:
        raise SystemExit("error: no training pairs left (every pair was too long, or none given)")
    max_steps = max(1, int(cfg.epochs * len(examples)) // cfg.batch_size)
    warmup = max(cfg.min_warmup, math.ceil(cfg.warmup_frac * max_steps))
    data_key = hashlib.sha256(json.dumps([examples, seq_len]).encode()).hexdigest()[:16]
    counts = {r: sum(p.rating == r for p in train_pairs) for r in RATINGS}
    log.print(f"data: {len(examples)} pairs ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
              f"{sum(len(c) + len(r) for c, r, _ in examples):,} tokens; {max_steps} steps of "
              f"{cfg.batch_size} pairs = {max_steps * cfg.batch_size / len(examples):.2f} epochs; "
              f"margin {cfg.margin}; warmup {warmup} steps")
    return examples, data_key, max_steps, warmup


def build_rm(chat, tokenizer, resumed, data_key: str, cfg: Config, rt, log):
    """The reward model: the chat model's body and a fresh scalar head (seeded), or the resumed
    weights (refused if the pairs or their batching differ); wrapped (DDP / FSDP under torchrun),
    then its optimizer. -> (rm, the module that trains, optimizer, start step)."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    rm = llama2.RewardModel.from_chat(chat, seed=cfg.seed)
    rm.tokenizer = tokenizer
    start_step = 0
    if resumed:
        training.check_same_model_args(resumed["model_args"], asdict(rm.args), str(ckpt_path))
        saved = resumed["data"]
        if saved["key"] != data_key or saved["batch_size"] != cfg.batch_size:
            raise SystemExit(f"error: cannot resume from {ckpt_path}: the pairs, --margin, "
                             "--seq_len, --train_frac or --batch_size differ from the run that "
                             "wrote it; use the same flags")
        rm.load_state_dict(resumed["model"])
        start_step = resumed["step"]
    model = training.wrap_model(rm, rt, cfg.parallel)
    optimizer = training.optimizer_for(rm, cfg, rt, resumed=resumed)
    if resumed:
        log.print(f"resumed from {ckpt_path} at step {start_step}")
    return rm, model, optimizer, start_step


def save_rm(rm, optimizer, tokenizer, cfg: Config, step: int, data: dict, rt, log) -> None:
    """<out_dir>/ckpt.pt, stage "rm" (collective under FSDP: every rank helps gather, rank 0
    writes)."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    state = training.stage_state(rm, optimizer, tokenizer, cfg, "rm", step, data=data)
    if rt.is_master:
        training.save_checkpoint(ckpt_path, state)
        log.print(f"saved {ckpt_path} at step {step}")


def train(rm, model, optimizer, examples, per_rank: int, start_step: int, max_steps: int,
          warmup: int, seq_len: int, save, cfg: Config, rt, log) -> int:
    """The steps from start_step: cosine lr, batch_size pairs in pair_order's order (rank r takes
    its slice, micro_batch at a time, each weighted by its share of the step's pairs), a log line
    with the pair accuracy, a checkpoint every save_every steps and at the end. -> the last step."""
    model.train()
    step = start_step
    end_step = min(max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else max_steps
    order: dict[int, list[int]] = {}
    while step < end_step:
        t0 = time.perf_counter()
        lr = training.cosine_lr(step, max_lr=cfg.lr, warmup_steps=warmup, total_steps=max_steps,
                                min_lr_ratio=cfg.min_lr_ratio)
        training.set_lr(optimizer, lr)
        idx = []
        for g in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
            epoch, slot = divmod(g, len(examples))
            if epoch not in order:
                order = {epoch: pair_order(len(examples), cfg.seed, epoch)}
            idx.append(order[epoch][slot])
        mine = idx[rt.rank * per_rank:(rt.rank + 1) * per_rank]
        stats = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, tokens
        for m in range(0, per_rank, cfg.micro_batch):
            batch = pair_batch([examples[i] for i in mine[m:m + cfg.micro_batch]], seq_len, rt.device)
            with training.sync_gradients(model, m + cfg.micro_batch >= per_rank):
                with rt.autocast():
                    r = model(batch["tokens"], batch["ends"], cu_seqlens=batch["cu_seqlens"])  # (2P,)
                rc, rr = r[0::2], r[1::2]  # (P,) each
                loss = rm_loss(rc, rr, batch["margin"])
                # each micro-batch weighted by its share of the step's pairs (DDP averages ranks)
                (loss * len(rc) / cfg.batch_size * rt.world_size).backward()
            stats += torch.tensor([loss.item() * len(rc), (rc > rr).sum().item(),
                                   batch["tokens"].numel()], dtype=torch.float64, device=rt.device)
        gnorm = training.clip_and_step(rm, optimizer, cfg.grad_clip)
        step += 1
        if rt.distributed:
            torch.distributed.all_reduce(stats)
        train_loss, acc = stats[0].item() / cfg.batch_size, stats[1].item() / cfg.batch_size
        if not math.isfinite(train_loss):
            raise SystemExit(f"error: the loss became {train_loss} at step {step}; lower --lr")
        dt = time.perf_counter() - t0
        line = (training.step_line(step, max_steps, train_loss, lr, gnorm, dt,
                                   stats[2].item() / dt) + f" | acc {100 * acc:.0f}%")
        log.write({"step": step, "loss": train_loss, "acc": acc, "lr": lr, "gnorm": gnorm,
                   "ms": dt * 1000, "tok_s": stats[2].item() / dt},
                  line if step % cfg.log_every == 0 or step == max_steps else None)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end_step:
            save(step)
    return step


if __name__ == "__main__":
    main()
    training.end_process()  # under torchrun: no interpreter teardown (see there)
