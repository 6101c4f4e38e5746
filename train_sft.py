"""Stage 2 of the Llama 2 recipe: supervised fine-tuning (paper §3.1, SPEC.md §5) and Ghost
Attention (paper §3.3 and A.3.5, SPEC.md §6), plus the judged evaluation of a chat model.

SFT. Dialogs in {"messages": [{"role": ..., "content": ...}, ...]} JSONL (ours or any real data
set) are encoded in Meta's chat format with llama2.encode_dialog. The loss covers only the
assistant's answer tokens and the EOS that ends each answer, so the model learns to stop: the
target at position t is token t+1 when token t+1 is an answer token, else -100. Examples are
packed into rows of the context length; attention never crosses from one example into another
(cu_seqlens) and RoPE positions restart at 0 for each example. `--pack false` pads instead.

Ghost Attention (`--gatt`). From the SFT model: take multi-turn user prompts and a standing
instruction, append the instruction to EVERY user message and sample each reply with the model,
turn by turn, the reply going into the history. For training, the instruction is kept only once,
as the system message (its short wording half of the time), and the loss covers only the kept
answers: each dialog is one example whose earlier prompts carry no loss. How a reply is chosen is
`--gatt_select`: `none` (one sample, every reply that ended with EOS kept; the default), `judge`
(best of K by the world's judge and only replies that obey: an ORACLE ablation, since the judge is
also the evaluation), `rm` (best of K by the reward model `--gatt_rm`, as the paper sampled GAtt data once it had one).

Evaluation (`--eval`), on held-out problems only: judged score overall and per family with its
floor (an empty reply, a bare correct answer), EOS rate and answer length with greedy decoding;
pass@1 against best-of-8 by the judge; instruction adherence at each turn 1..12 of dialogs whose
instruction is given once, as the system message, the model's own replies going into the history:
obeys, obeys and correct, per instruction, on instructions GAtt trains on and on the ones it never
sees (world.GATT_UNSEEN), beside the free floor (evaluate.run_eval, the one evaluation module).
Writes <out_dir>/eval.jsonl and adherence.png.

    # SFT from a pretraining checkpoint (ours, Meta's or Hugging Face's), on the world's dialogs
    python train_sft.py --checkpoint out/pretrain --data world --out_dir out/sft
    # ... or on your own JSONL, the Llama 2 hyperparameters (SPEC.md §5)
    python train_sft.py --checkpoint llama-2-7b --data sft.jsonl --seq_len 4096 --batch_size 64
    # data parallel: each process takes its share of every step's rows (DDP; --parallel fsdp)
    torchrun --nproc_per_node=2 train_sft.py --checkpoint out/pretrain --data world --device cpu
    # Ghost Attention on top of the SFT model (under torchrun rank 0 builds the data)
    python train_sft.py --gatt --checkpoint out/sft --out_dir out/gatt
    # evaluate, and draw the adherence curve beside earlier evaluations
    python train_sft.py --eval --checkpoint out/gatt --out_dir out/eval_gatt \\
        --plot_with out/eval_sft/eval.jsonl
    # chat with the result
    python llama2.py --checkpoint out/gatt --chat --system "Always answer in capital letters."

Checkpoint: <out_dir>/ckpt.pt in our format ("model_args", "model", "tokenizer", "config",
"stage": "sft" or "gatt", plus optimizer, step, RNG and data position for `--resume`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# OpenMP threads that busy-wait stall when other processes share the cores (as in train_pretrain.py;
# seen here beside one other busy process: 11 s per demo SFT step with 2 default threads, 1.5 s with
# OMP_NUM_THREADS=1 and passive waiting). Let them sleep; read when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import evaluate
import gatt
import llama2
import training
import world

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # model
    checkpoint: str = "out/pretrain"  # start (or, with --eval, evaluate) from this: our ckpt dir/file, a Meta dir or a Hugging Face dir
    tokenizer: str = ""  # tokenizer.model, only if the checkpoint carries none (Meta / HF dirs)
    # data
    data: str = "world"  # JSONL files of {"messages": [...]}, comma-separated; "world" = generate world.sft_dialogs
    world_n: int = 20000  # dialogs generated when --data world
    world_levels: str = "1,2,3,4"  # difficulty levels of the generated dialogs
    world_p_instruction: float = 0.35  # share of generated dialogs with a standing instruction (always 1-2 turns)
    world_writers: str = "careful"  # who writes the generated answers: careful (the curated set), mixed (writers of varied quality, world.WRITERS: the paper's §5.1 tail) or crowd (world.CROWD: a lapse most writers share)
    pack: bool = True  # pack examples into full rows (no attention across examples); false = one padded example per row
    seq_len: int = 0  # tokens per row (0 = the model's context; Llama 2: 4096); longer examples are dropped
    # optimization (Llama 2 SFT, §3.1)
    epochs: float = 2.0  # passes over the data (Llama 2: 2)
    batch_size: int = 64  # rows per optimizer step (Llama 2: 64)
    micro_batch: int = 1  # rows per forward pass (gradient accumulation up to batch_size)
    lr: float = 2e-5  # peak learning rate (Llama 2: 2e-5)
    warmup_steps: int = 0  # linear warmup steps before the cosine
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak lr
    weight_decay: float = 0.1  # AdamW weight decay on the weight matrices (Llama 2: 0.1)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-5  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    parallel: str = "ddp"  # under torchrun: ddp or fsdp (each rank trains on its share of a step's rows)
    # Ghost Attention
    gatt: bool = False  # build Ghost Attention data with the checkpoint's model and fine-tune on it (stage "gatt")
    gatt_n: int = 64  # GAtt dialogs (instruction + user prompts) to roll out
    gatt_min_turns: int = 2  # user turns per GAtt dialog, at least
    gatt_max_turns: int = 12  # user turns per GAtt dialog, at most
    gatt_levels: str = "1,2"  # difficulty levels of the GAtt prompts
    gatt_select: str = "none"  # how a reply is chosen: none (one sample, no filter), judge (best of gatt_k by the world's judge and only obeying replies: an ORACLE ablation), rm (best of gatt_k by the reward model --gatt_rm)
    gatt_k: int = 4  # replies sampled per turn for --gatt_select judge or rm
    gatt_rm: str = ""  # reward model (train_rm.py) that picks the replies with --gatt_select rm
    gatt_temperature: float = 0.7  # sampling temperature of the GAtt replies
    gatt_mix: int = 0  # dialogs of --data mixed into the GAtt fine-tuning set (keeps the plain SFT skills)
    # evaluation
    eval: bool = False  # evaluate --checkpoint instead of training
    eval_n: int = 200  # held-out prompts scored with greedy decoding
    eval_bestof_n: int = 64  # held-out prompts for pass@1 vs best-of-K
    eval_k: int = 8  # samples per prompt for best-of-K
    eval_temperature: float = 0.7  # sampling temperature for pass@1 / best-of-K
    eval_mt_n: int = 32  # 12-turn dialogs for adherence by turn
    eval_turns: int = 12  # user turns per adherence dialog
    eval_levels: str = "1,2,3,4"  # difficulty levels of the held-out prompts
    eval_split: str = "heldout"  # where evaluation prompts come from: heldout (the test split, for the report) or valid (the validation split, to choose hyperparameters on)
    fewshot: int = 0  # solved example turns put before each prompt (for a pretrained model); also cuts replies at "[INST]"
    max_new_tokens: int = 48  # longest reply generated in evaluation and GAtt sampling
    plot_with: str = ""  # other eval.jsonl files whose adherence curves go into the same PNG
    label: str = ""  # name of this model in plots (default: the checkpoint's stage)
    gen_batch: int = 64  # prompts per batched generate call
    # logging and checkpoints
    out_dir: str = "out/sft"  # where ckpt.pt, metrics.jsonl (and eval.jsonl) go
    log_every: int = 1  # print a step line every N steps
    save_every: int = 0  # write ckpt.pt every N steps (0 = only at the end)
    stop_at_step: int = 0  # stop (and save) after this step, e.g. to test --resume (0 = run to the end)
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16
    kernels: str = "auto"  # hot paths: auto, ext, ref
    seed: int = 1337  # seeds data order, generated data and sampling


# -----------------------------------------------------------------------------------------------
# data: JSONL dialogs -> (ids, loss mask) examples -> packed rows -> batches


@dataclass
class Example:
    """One encoded dialog: token ids and the loss mask over them (1 = a token the model learns
    to produce: an answer token or the EOS that ends an answer)."""
    ids: list[int]
    mask: list[int]
    where: str = ""  # "file:line" of its source, for messages

    def __len__(self) -> int:
        return len(self.ids) - 1  # input tokens once shifted (the last token is only a target)


TRAIN_ON = ("all", "last")  # which answers carry loss: every one, only the last, or a list of flags


def _check_train_on(train_on, messages: list[dict]) -> None:
    n = sum(m["role"] == "assistant" for m in messages)
    if isinstance(train_on, list):
        if len(train_on) != n or not all(isinstance(f, bool) for f in train_on):
            raise ValueError(f'"train_on" as a list needs one true/false per assistant message '
                             f"({n}), got {train_on!r}")
    elif train_on not in TRAIN_ON:
        raise ValueError(f'"train_on" must be one of {TRAIN_ON} or a list of true/false per '
                         f"assistant message, got {train_on!r}")


def read_dialogs(path: str) -> list[tuple[list[dict], str, str]]:
    """Read a JSONL file of {"messages": [...]} lines, each optionally with "train_on": "all" |
    "last" | [true/false per assistant message] (which answers carry loss).

    Returns (messages, train_on, "path:line") per dialog. A malformed line (bad JSON, no
    "messages" list, an unknown role, roles out of order, not ending with an assistant message)
    raises ValueError naming the file and line number and what was wrong.
    """
    shape = '{"messages": [{"role": ..., "content": ...}, ...]}'

    def parse(obj, where):
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise ValueError(f'no "messages" list; each line must be {shape}')
        try:
            world.validate_dialog(obj["messages"], ends_with="assistant")
        except ValueError as e:
            raise ValueError(f"bad dialog: {e}") from None
        train_on = obj.get("train_on", "all")
        _check_train_on(train_on, obj["messages"])
        return obj["messages"], train_on, where

    return training.read_jsonl(path, parse, expect=f"each line must be {shape}",
                               missing="give JSONL files or --data world")


def write_dialogs(path: str | Path, dialogs: list[tuple[list[dict], object]]) -> None:
    """Write (messages, train_on) pairs as JSONL, atomically (the GAtt data of a run)."""
    with training.atomic_write(path, "w") as f:
        for messages, train_on in dialogs:
            f.write(json.dumps({"messages": messages, "train_on": train_on}) + "\n")


def encode_example(tokenizer, messages: list[dict], train_on: str = "all", where: str = ""):
    """Encode a dialog ending with an assistant answer; the mask marks the answers that carry loss.

    train_on "all": every assistant answer and its EOS (SFT). "last": only the final answer and
    its EOS. A list of flags, one per assistant message: the answers flagged true (Ghost
    Attention: the kept answers; every other token, other answers included, gets no loss).
    """
    _check_train_on(train_on, messages)
    ids, mask = llama2.encode_dialog(tokenizer, messages, for_training=True)
    if train_on == "all":
        return Example(ids, mask, where)
    # each answer (and its EOS) is one run of 1s in the mask, in order
    runs, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    flags = [False] * (len(runs) - 1) + [True] if train_on == "last" else train_on
    if len(runs) != len(flags):
        raise ValueError(f"{where}: found {len(runs)} answers in the encoded dialog, expected "
                         f"{len(flags)}")
    mask = [0] * len(mask)
    for (a, b), keep in zip(runs, flags):
        if keep:
            mask[a:b] = [1] * (b - a)
    return Example(ids, mask, where)


def example_io(ex: Example) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: inputs ids[:-1]; target t is ids[t+1] where token t+1
    carries loss (mask 1), else -100 (ignored by the cross-entropy)."""
    x = ex.ids[:-1]
    y = [tok if m else -100 for tok, m in zip(ex.ids[1:], ex.mask[1:])]
    return x, y


def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedily fill rows of at most seq_len tokens with examples in the given order.

    Returns the example indices of each row. Every length must be <= seq_len (drop longer
    examples first, see fit_examples).
    """
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than a row of {seq_len}")
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def fit_examples(examples: list[Example], seq_len: int) -> tuple[list[Example], list[Example]]:
    """Split examples into (kept, dropped): an example whose inputs exceed seq_len is DROPPED
    (truncating it would cut off its answer's EOS and teach the model not to stop)."""
    kept = [e for e in examples if len(e) <= seq_len]
    dropped = [e for e in examples if len(e) > seq_len]
    return kept, dropped


PAD_ID = 0  # filler token in unused row slots: never a target, and in a segment of its own


def make_batch(examples: list[Example], rows: list[list[int]], pack: bool = True,
               device="cpu") -> dict:
    """Tensors for one micro-batch of rows.

    tokens, targets, positions: (B, T) int64 with T the longest row; unused slots are PAD_ID with
    target -100. pack=True: a row holds several examples back to back, positions restart at 0
    for each, and cu_seqlens (int32, over the flattened B*T tokens) marks every example and every
    row's padding as a segment of its own, so attention stays within an example. pack=False: one
    example per row, positions 0..T-1, no cu_seqlens (causal attention never sees the padding
    that follows a sequence).
    """
    ios = [[example_io(examples[i]) for i in row] for row in rows]
    if not pack and any(len(r) != 1 for r in rows):
        raise ValueError("make_batch(pack=False) needs exactly one example per row")
    T = max(sum(len(x) for x, _ in row) for row in ios)
    tokens, targets, positions, seqlens = [], [], [], []
    for row in ios:
        tok = [t for x, _ in row for t in x]
        tgt = [t for _, y in row for t in y]
        pos = [p for x, _ in row for p in range(len(x))]
        pad = T - len(tok)
        tokens.append(tok + [PAD_ID] * pad)
        targets.append(tgt + [-100] * pad)
        positions.append(pos + list(range(pad)))
        seqlens += [len(x) for x, _ in row] + ([pad] if pad else [])
    batch = {"tokens": torch.tensor(tokens, dtype=torch.long, device=device),
             "targets": torch.tensor(targets, dtype=torch.long, device=device),
             "positions": torch.tensor(positions, dtype=torch.long, device=device),
             "cu_seqlens": None}
    if pack:
        cu = [0]
        for n in seqlens:
            cu.append(cu[-1] + n)
        batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=device)
    else:
        batch["positions"] = None  # the model's default 0..T-1
    return batch


def forward_batch(model, batch: dict):
    """model(tokens, targets) with the batch's positions / cu_seqlens -> (logits, loss)."""
    return model(batch["tokens"], batch["targets"], positions=batch["positions"],
                 cu_seqlens=batch["cu_seqlens"])


class RowSampler:
    """Deterministic order of rows over epochs: epoch e visits the rows in a permutation seeded by
    (seed, e); global row number g is epoch g // R, slot g % R. One integer (the step) is the data
    position, so a resumed run continues exactly where it stopped."""

    def __init__(self, n_rows: int, seed: int):
        if n_rows == 0:
            raise ValueError("no training rows: every example was dropped or the data is empty")
        self.R, self.seed = n_rows, seed
        self._epoch, self._perm = -1, None

    def row(self, g: int) -> int:
        epoch, slot = divmod(g, self.R)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.R, generator=gen), epoch
        return int(self._perm[slot])


def _levels(text: str, flag: str) -> tuple:
    """A --*_levels flag as a tuple, or one clear error line."""
    try:
        return world.parse_levels(text)
    except ValueError as e:
        raise SystemExit(f"error: --{flag}: {e}") from None


def load_dialogs(cfg: Config, n_world: int | None = None) -> list[tuple[list[dict], str, str]]:
    """The --data dialogs: JSONL files, or freshly generated world dialogs (seeded)."""
    if cfg.data == "world":
        n = cfg.world_n if n_world is None else n_world
        levels = _levels(cfg.world_levels, "world_levels")
        try:
            if cfg.world_writers not in world.WRITER_MIXES:
                raise SystemExit(f"error: --world_writers {cfg.world_writers!r}: give one of "
                                 f"{', '.join(world.WRITER_MIXES)}")
            dialogs = world.sft_dialogs(n, seed=cfg.seed, p_instruction=cfg.world_p_instruction,
                                        levels=levels, writers=cfg.world_writers)
        except ValueError as e:
            raise SystemExit(f"error: --world_p_instruction {cfg.world_p_instruction}: give a share "
                             f"in [0, 1] that leaves room for the multi-turn dialogs ({e})") from None
        return [(d, "all", f"world.sft_dialogs[{i}]") for i, d in enumerate(dialogs)]
    out = []
    for path in [p for p in cfg.data.split(",") if p]:
        try:
            out += read_dialogs(path)
        except (ValueError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {e}") from None
    if n_world is not None:
        out = out[:n_world]
    return out


# -----------------------------------------------------------------------------------------------
# the script


def main(argv=None) -> None:
    cfg = training.parse_config(Config, argv, description=__doc__)
    rt = training.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    try:
        _main(cfg, rt)
    finally:
        training.cleanup_runtime()


def _main(cfg: Config, rt) -> None:
    if rt.distributed and cfg.eval:
        raise SystemExit("error: --eval runs in one process; run it without torchrun")
    if cfg.kernels != "auto":
        try:
            llama2.set_kernels(cfg.kernels)
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: --kernels {cfg.kernels}: {e}") from None
    if cfg.eval and cfg.gatt:
        raise SystemExit("error: give --eval or --gatt, not both (evaluate the GAtt checkpoint "
                         "in a second command)")
    for flag in ("world_levels", "gatt_levels", "eval_levels"):
        _levels(getattr(cfg, flag), flag)  # a bad level string fails here, before any work
    if cfg.gatt_select not in gatt.GATT_SELECT:
        raise SystemExit(f"error: --gatt_select {cfg.gatt_select!r}: use one of "
                         f"{gatt.GATT_SELECT}")
    if cfg.gatt and cfg.gatt_select == "rm" and not cfg.gatt_rm:
        raise SystemExit("error: --gatt_select rm needs --gatt_rm path/to/reward_model "
                         "(a train_rm.py checkpoint)")
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    stage = "gatt" if cfg.gatt else "sft"

    # ---- model: the parent checkpoint, or our own when resuming
    resumed = training.load_resume(ckpt_path, stage) if cfg.resume else None
    try:
        model, tokenizer = llama2.load_model(cfg.checkpoint, device=str(rt.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint}: {e}") from None
    if cfg.tokenizer:
        tokenizer = llama2.Tokenizer(cfg.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"error: {cfg.checkpoint} carries no tokenizer; pass --tokenizer "
                         "path/to/tokenizer.model")
    model = model.float()  # train and sample in float32 weights (autocast handles bf16)
    parent_stage = _stage_of(cfg.checkpoint)

    if cfg.eval:
        evaluate.run_eval(model, tokenizer, cfg, rt, label=cfg.label or parent_stage)
        return

    seq_len = cfg.seq_len or model.args.max_seq_len
    if seq_len > model.args.max_seq_len:
        raise SystemExit(f"error: --seq_len {seq_len} is longer than the model's context "
                         f"({model.args.max_seq_len}); lower it")
    # under torchrun each rank takes batch_size / world_size of a step's rows, micro_batch at a time
    per_rank = training.rows_per_rank(cfg.batch_size, cfg.micro_batch, rt)
    if rt.is_master:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a fresh run starts a fresh log; a resumed one drops what came after its checkpoint
        training.trim_metrics(out_dir / "metrics.jsonl", resumed["step"] if resumed else 0)
    log = training.MetricsLog(out_dir / "metrics.jsonl", rt)

    # ---- data: SFT dialogs, or GAtt samples built with the model (kept on disk for --resume)
    if cfg.gatt:
        gatt_file = out_dir / "gatt_data.jsonl"
        if (resumed and gatt_file.exists()) or not rt.is_master:
            # resuming, or another rank under torchrun: rank 0 builds the data, the others read it
            _barrier(rt)
            dialogs = read_dialogs(str(gatt_file))
            log.print(f"GAtt data read back from {gatt_file} ({len(dialogs)} samples)")
        else:
            t0 = time.perf_counter()
            rm = load_gatt_rm(cfg, tokenizer, rt) if cfg.gatt_select == "rm" else None
            samples, stats = gatt.build_gatt_data(model, tokenizer, cfg, rt, seq_len, rm=rm)
            del rm
            mix = load_dialogs(cfg, cfg.gatt_mix) if cfg.gatt_mix else []
            write_dialogs(gatt_file, samples + [(m, t) for m, t, _ in mix])
            dialogs = read_dialogs(str(gatt_file))
            if stats["samples"] == 0:
                log.print("warning: no GAtt sample: no chosen reply both obeyed its instruction "
                          "and ended with EOS; fine-tune the SFT model further, raise --gatt_k, "
                          "or check the model with --eval first")
            how = {"judge": f"best of {stats['k']} by the judge (ORACLE ablation)",
                   "rm": f"best of {stats['k']} by the reward model {cfg.gatt_rm}",
                   "none": "one sample each, no filter"}[stats["select"]]
            log.write({"gatt_data": stats, "seconds": time.perf_counter() - t0},
                      f"GAtt data ({how}): {stats['samples']} dialogs of {stats['dialogs']} "
                      f"({stats['turns']} turns sampled, {stats['kept_turns']} with loss, "
                      f"{stats['cut_to_fit']} dialogs cut to fit; {stats['obey_rate']:.1%} of "
                      f"chosen replies obey, {stats['eos_rate']:.1%} end with EOS) + {len(mix)} "
                      f"SFT dialogs mixed in; {time.perf_counter() - t0:.0f}s -> {gatt_file}")
            _barrier(rt)
    else:
        dialogs = load_dialogs(cfg)
    examples = []
    for messages, train_on, where in dialogs:
        try:
            examples.append(encode_example(tokenizer, messages, train_on, where))
        except ValueError as e:
            raise SystemExit(f"error: {where}: {e}") from None
    examples, dropped = fit_examples(examples, seq_len)
    if dropped:
        log.print(f"dropped {len(dropped)} of {len(dropped) + len(examples)} examples longer "
                  f"than --seq_len {seq_len} (e.g. {dropped[0].where}, {len(dropped[0])} tokens)")
    if not examples:
        raise SystemExit(f"error: no training examples left: all {len(dropped)} are longer than "
                         f"--seq_len {seq_len} tokens" + (f" (e.g. {dropped[0].where}, "
                                                          f"{len(dropped[0])} tokens)" if dropped
                                                          else "") + "; raise --seq_len (up to "
                         "the model's context) or give shorter dialogs")
    # a seeded shuffle, then greedy packing (or one example per row)
    random.Random(cfg.seed).shuffle(examples)
    rows = (pack_rows([len(e) for e in examples], seq_len) if cfg.pack
            else [[i] for i in range(len(examples))])
    sampler = RowSampler(len(rows), cfg.seed)
    # what a resumed run must see again: every row's examples in order, their ids and loss
    # masks, and the packing (row boundaries), so --pack or --seq_len changes are refused
    data_key = hashlib.sha256(json.dumps(
        [[(examples[i].ids, examples[i].mask) for i in r] for r in rows]
        + [cfg.pack, seq_len]).encode()).hexdigest()[:16]
    max_steps = max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    n_loss = sum(sum(e.mask[1:]) for e in examples)
    n_tok = sum(len(e) for e in examples)
    log.print(f"data: {len(examples)} examples, {n_tok:,} tokens ({n_loss:,} with loss) in "
              f"{len(rows)} rows of <= {seq_len} ({'packed' if cfg.pack else 'padded'}, "
              f"fill {n_tok / (len(rows) * seq_len):.0%}); {max_steps} steps of "
              f"{cfg.batch_size} rows = {cfg.epochs:g} epochs")

    # ---- resume the weights, wrap (DDP / FSDP under torchrun), then the optimizer: it must see
    # the wrapped model's parameters (FSDP replaces them with sharded ones)
    start_step = 0
    if resumed:
        training.check_same_model_args(resumed["model_args"], asdict(model.args), str(ckpt_path))
        saved = resumed["data"]
        if saved["rows"] != len(rows):
            raise SystemExit(f"error: cannot resume from {ckpt_path}: it was trained on "
                             f"{saved['rows']} rows, these flags give {len(rows)} (--data, "
                             "--pack, --seq_len or the GAtt data differ); use the same flags")
        if saved["key"] != data_key or saved["batch_size"] != cfg.batch_size:
            raise SystemExit(f"error: cannot resume from {ckpt_path}: the data, its packing "
                             "(--pack, --seq_len) or --batch_size differ from the run that wrote "
                             "it; use the same flags")
        model.load_state_dict(resumed["model"])
        start_step = resumed["step"]
    wrapped = training.wrap_model(model, rt, cfg.parallel)  # DDP / FSDP under torchrun, else model
    optimizer = training.make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                        device_type=rt.device_type)
    if resumed:
        training.load_optimizer_state_dict(model, optimizer, resumed["optimizer"])
        training.set_rng_state(resumed["rng"])
        del resumed
        log.print(f"resumed from {ckpt_path} at step {start_step}")

    def save(step: int) -> None:
        state = {
            "model_args": asdict(model.args),
            "model": training.model_state_dict(model),  # collective under FSDP
            "optimizer": training.optimizer_state_dict(model, optimizer),
            "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
            "config": asdict(cfg),
            "stage": stage,
            "parent": cfg.checkpoint,
            "step": step,
            "rng": training.rng_state(),
            "data": {"key": data_key, "rows": len(rows), "batch_size": cfg.batch_size,
                     "rows_seen": step * cfg.batch_size},
        }
        if rt.is_master:
            training.save_checkpoint(ckpt_path, state)
            log.print(f"saved {ckpt_path} at step {step}")

    # ---- training loop: the loss of a step is the mean over all its answer tokens
    log.print(f"{stage}: {model.num_params() / 1e6:.2f}M parameters from {cfg.checkpoint} "
              f"({parent_stage}); {rt.device}, {rt.world_size} process(es), kernels "
              f"{llama2.kernels_in_use()}")
    model.train()
    step = start_step
    end_step = min(max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else max_steps
    while step < end_step:
        t0 = time.perf_counter()
        lr = training.cosine_lr(step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                total_steps=max_steps, min_lr_ratio=cfg.min_lr_ratio)
        training.set_lr(optimizer, lr)
        step_rows = [rows[sampler.row(step * cfg.batch_size + i)] for i in range(cfg.batch_size)]
        n_kept = sum(sum(examples[i].mask[1:]) for r in step_rows for i in r)
        mine = step_rows[rt.rank * per_rank:(rt.rank + 1) * per_rank]
        stats = torch.zeros(2, dtype=torch.float64, device=rt.device)  # loss sum, tokens
        for m in range(0, per_rank, cfg.micro_batch):
            batch = make_batch(examples, mine[m:m + cfg.micro_batch], cfg.pack, rt.device)
            k = int((batch["targets"] != -100).sum())
            # (a micro-batch without answer tokens still runs: under DDP every rank must reach the
            # gradient all-reduce; its loss is 0 * the mean of nothing, so it is skipped as 0)
            with training.sync_gradients(wrapped, m + cfg.micro_batch >= per_rank):
                with rt.autocast():
                    _, loss = forward_batch(wrapped, batch)
                loss = loss if k else loss.nan_to_num(0.0) * 0.0
                # weight each micro-batch by its share of the whole step's answer tokens (all
                # ranks); x world_size because DDP averages the ranks' gradients
                (loss * (k / n_kept * rt.world_size)).backward()
            stats += torch.tensor([loss.item() * k, batch["tokens"].numel()],
                                  dtype=torch.float64, device=rt.device)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):  # FSDP returns a DTensor
            gnorm = gnorm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if rt.distributed:
            torch.distributed.all_reduce(stats)
        train_loss, tokens = stats[0].item() / n_kept, stats[1].item()
        if not math.isfinite(train_loss):
            raise SystemExit(f"error: the loss became {train_loss} at step {step}; lower --lr")
        dt = time.perf_counter() - t0
        line = training.step_line(step, max_steps, train_loss, lr, gnorm.item(), dt, tokens / dt)
        log.write({"step": step, "loss": train_loss, "lr": lr, "gnorm": gnorm.item(),
                   "answer_tokens": n_kept, "ms": dt * 1000, "tok_s": tokens / dt},
                  line if step % cfg.log_every == 0 or step == max_steps else None)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end_step:
            save(step)
    if start_step >= max_steps:
        log.print(f"nothing to do: {ckpt_path} is already at step {start_step} of {max_steps}")
    log.print(f"done: {stage} checkpoint {ckpt_path}")


def _barrier(rt) -> None:
    """Under torchrun: rank 0 builds a file the other ranks read; they wait at this barrier before
    reading, rank 0 reaches it after writing. One process: nothing."""
    if rt.distributed:
        torch.distributed.barrier()


def load_gatt_rm(cfg: Config, tokenizer, rt):
    """The reward model of --gatt_select rm; it must read the chat model's tokens."""
    try:
        rm, rm_tok = llama2.load_reward_model(cfg.gatt_rm, device=str(rt.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --gatt_rm {cfg.gatt_rm}: {e}") from None
    if rm_tok is None or rm_tok.model_bytes != tokenizer.model_bytes:
        raise SystemExit(f"error: --gatt_rm {cfg.gatt_rm} does not use the tokenizer of "
                         f"{cfg.checkpoint}; train the reward model from this model's family")
    rm.tokenizer = rm_tok
    return rm.float()


def _stage_of(path: str) -> str:
    """The "stage" recorded in one of our checkpoints ("pretrain", "sft", ...), else "external"."""
    p = Path(path)
    p = p / "ckpt.pt" if p.is_dir() else p
    if p.is_file() and p.suffix == ".pt":
        # (a damaged file is one clear error line here, as in llama2.load_model)
        return str(llama2.load_checkpoint_file(p).get("stage", "external"))
    return "external"


if __name__ == "__main__":
    main()
