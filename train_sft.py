"""Stage 2 of the Llama 2 recipe: supervised fine-tuning (paper §3.1, SPEC.md §5) and Ghost
Attention (paper §3.3 and A.3.5, SPEC.md §6), plus the judged evaluation of a chat model.

SFT. Dialogs in {"messages": [{"role": ..., "content": ...}, ...]} JSONL (ours or any real data
set) are encoded in Meta's chat format with llama2.encode_dialog. The loss covers only the
assistant's answer tokens and the EOS that ends each answer, so the model learns to stop: the
target at position t is token t+1 when token t+1 is an answer token, else -100. Examples are
packed into rows of the context length; attention never crosses from one example into another
(cu_seqlens) and RoPE positions restart at 0 for each example. `--pack false` pads instead.
The encoding, packing, batching and the training step live in sft_data.py (rejection sampling,
train_rlhf.py, fine-tunes the same way); this script is the stage's steps (_main).

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
from dataclasses import asdict, dataclass
from pathlib import Path

# OpenMP threads that busy-wait stall when other processes share the cores (as in train_pretrain.py;
# seen here beside one other busy process: 11 s per demo SFT step with 2 default threads, 1.5 s with
# OMP_NUM_THREADS=1 and passive waiting). Let them sleep; read when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import evaluate
import gatt
import llama2
import sft_data
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
    world_safety: float = 0.0  # share of the generated dialogs that are safety demonstrations (world.safety_dialogs: requests for a secret, 80% adversarial, and borderline prompts, written by --world_writers; paper §4.2.2)
    world_safety_preprompt: float = 0.0  # share of those safety demonstrations that carry the safety preprompt (world.SAFETY_PREPROMPT), which the writers heed: what context distillation (train_rlhf.py --method distill) needs the model to have learned
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
    eval_safety_n: int = 200  # safety prompts of the evaluation split (requests for a secret, borderline prompts): violation and false-refusal rates (0 = none)
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
    dtype: str = "auto"  # autocast: auto (bfloat16 on a GPU or a CPU with AMX-BF16 or AVX512-BF16, else float32), float32, bfloat16
    kernels: str = "auto"  # hot paths: auto, ext, ref
    seed: int = 1337  # seeds data order, generated data and sampling


# -----------------------------------------------------------------------------------------------
# data: JSONL dialogs -> (ids, loss mask) examples -> packed rows -> batches


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
            if not 0 <= cfg.world_safety <= 1:
                raise SystemExit(f"error: --world_safety {cfg.world_safety}: give a share in [0, 1]")
            n_safety = round(n * cfg.world_safety)
            dialogs = world.sft_dialogs(n - n_safety, seed=cfg.seed,
                                        p_instruction=cfg.world_p_instruction, levels=levels,
                                        writers=cfg.world_writers)
        except ValueError as e:
            raise SystemExit(f"error: --world_p_instruction {cfg.world_p_instruction}: give a share "
                             f"in [0, 1] that leaves room for the multi-turn dialogs ({e})") from None
        out = [(d, "all", f"world.sft_dialogs[{i}]") for i, d in enumerate(dialogs)]
        if n_safety:  # safety demonstrations, spread through the set (seeded)
            out += [(d, "all", f"world.safety_dialogs[{i}]") for i, d in enumerate(
                world.safety_dialogs(n_safety, seed=cfg.seed, levels=levels,
                                     writers=cfg.world_writers,
                                     p_preprompt=cfg.world_safety_preprompt))]
            random.Random(f"safety-mix-{cfg.seed}").shuffle(out)
        return out
    out = []
    for path in [p for p in cfg.data.split(",") if p]:
        try:
            out += sft_data.read_dialogs(path)
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
    """The stage as a list of steps: flags, model, (evaluation,) data, resume, train."""
    check_flags(cfg, rt)
    stage = "gatt" if cfg.gatt else "sft"
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    # ---- model: the parent checkpoint, or our own when resuming
    resumed = training.load_resume(ckpt_path, stage) if cfg.resume else None
    model, tokenizer = load_start(cfg, rt)
    parent_stage = training.stage_of(cfg.checkpoint) or "external"
    if cfg.eval:
        evaluate.run_eval(model, tokenizer, cfg, rt, label=cfg.label or parent_stage)
        return
    seq_len = training.context_length(cfg.seq_len, model.args.max_seq_len)
    # under torchrun each rank takes batch_size / world_size of a step's rows, micro_batch at a time
    training.rows_per_rank(cfg.batch_size, cfg.micro_batch, rt)
    log = training.open_metrics(Path(cfg.out_dir), resumed["step"] if resumed else 0, rt)
    # ---- data: SFT dialogs, or GAtt samples built with the model (kept on disk for --resume)
    dialogs = gatt_dialogs(model, tokenizer, cfg, rt, seq_len, resumed, log) if cfg.gatt else load_dialogs(cfg)
    examples, rows, data_key = pack_examples(dialogs, tokenizer, seq_len, cfg, log)
    max_steps = max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    # ---- resume the weights, wrap (DDP / FSDP under torchrun), then the optimizer
    wrapped, optimizer, start_step = resume_and_wrap(model, resumed, rows, data_key, cfg, rt, log)
    del resumed
    data = {"key": data_key, "rows": len(rows), "batch_size": cfg.batch_size}
    save = lambda step: save_state(model, optimizer, tokenizer, cfg, stage, step, data, rt, log)  # noqa: E731
    # ---- training loop: the loss of a step is the mean over all its answer tokens
    log.print(f"{stage}: {model.num_params() / 1e6:.2f}M parameters from {cfg.checkpoint} "
              f"({parent_stage}); {rt.device}, {rt.world_size} process(es), kernels "
              f"{llama2.kernels_in_use()}")
    train(model, wrapped, optimizer, examples, rows, start_step, max_steps, save, cfg, rt, log)
    if start_step >= max_steps:
        log.print(f"nothing to do: {ckpt_path} is already at step {start_step} of {max_steps}")
    log.print(f"done: {stage} checkpoint {ckpt_path}")


def check_flags(cfg: Config, rt) -> None:
    """Bad flag combinations -> one `error:` line, before any work."""
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


def load_start(cfg: Config, rt):
    """The model to fine-tune (or evaluate) and its tokenizer, float32 weights (autocast handles
    bf16)."""
    try:
        model, tokenizer = llama2.load_model(cfg.checkpoint, device=str(rt.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --checkpoint {cfg.checkpoint}: {e}") from None
    if cfg.tokenizer:
        tokenizer = llama2.Tokenizer(cfg.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"error: {cfg.checkpoint} carries no tokenizer; pass --tokenizer "
                         "path/to/tokenizer.model")
    return model.float(), tokenizer


def gatt_dialogs(model, tokenizer, cfg: Config, rt, seq_len: int, resumed, log) -> list:
    """Ghost Attention's training dialogs, built with the model by rank 0 and written to
    <out_dir>/gatt_data.jsonl (with --gatt_mix SFT dialogs mixed in); a resumed run and the other
    ranks under torchrun read that file back."""
    gatt_file = Path(cfg.out_dir) / "gatt_data.jsonl"
    if (resumed and gatt_file.exists()) or not rt.is_master:
        # resuming, or another rank under torchrun: rank 0 builds the data, the others read it
        training.barrier(rt)
        dialogs = sft_data.read_dialogs(str(gatt_file))
        log.print(f"GAtt data read back from {gatt_file} ({len(dialogs)} samples)")
        return dialogs
    t0 = time.perf_counter()
    rm = (training.load_reward_model(cfg.gatt_rm, "--gatt_rm", tokenizer, cfg.checkpoint, rt).float()
          if cfg.gatt_select == "rm" else None)
    samples, stats = gatt.build_gatt_data(model, tokenizer, cfg, rt, seq_len, rm=rm)
    del rm
    mix = load_dialogs(cfg, cfg.gatt_mix) if cfg.gatt_mix else []
    sft_data.write_dialogs(gatt_file, samples + [(m, t) for m, t, _ in mix])
    dialogs = sft_data.read_dialogs(str(gatt_file))
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
    training.barrier(rt)
    return dialogs


def pack_examples(dialogs: list, tokenizer, seq_len: int, cfg: Config, log):
    """Encode the dialogs, drop those longer than seq_len, shuffle (seeded) and pack them into
    rows (or one example per row with --pack false). -> (examples, rows, data key): the key is
    what a resumed run must see again: every row's examples in order, their ids and loss masks,
    and the packing (row boundaries), so --pack or --seq_len changes are refused."""
    examples = []
    for messages, train_on, where in dialogs:
        try:
            examples.append(sft_data.encode_example(tokenizer, messages, train_on, where))
        except ValueError as e:
            raise SystemExit(f"error: {where}: {e}") from None
    examples, dropped = sft_data.fit_examples(examples, seq_len)
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
    rows = (sft_data.pack_rows([len(e) for e in examples], seq_len) if cfg.pack
            else [[i] for i in range(len(examples))])
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
    return examples, rows, data_key


def resume_and_wrap(model, resumed, rows, data_key: str, cfg: Config, rt, log):
    """Load the resumed weights (refused if the data or its packing differ), wrap the model (DDP
    / FSDP under torchrun), then build the optimizer: it must see the wrapped model's parameters
    (FSDP replaces them with sharded ones). -> (wrapped model, optimizer, start step)."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
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
    wrapped = training.wrap_model(model, rt, cfg.parallel)  # DDP / FSDP under torchrun, else model
    optimizer = training.optimizer_for(model, cfg, rt, resumed=resumed)
    if not resumed:
        return wrapped, optimizer, 0
    log.print(f"resumed from {ckpt_path} at step {resumed['step']}")
    return wrapped, optimizer, resumed["step"]


def save_state(model, optimizer, tokenizer, cfg: Config, stage: str, step: int, data: dict, rt,
               log) -> None:
    """<out_dir>/ckpt.pt: the model and everything --resume needs (collective under FSDP: every
    rank helps gather, rank 0 writes)."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    state = training.stage_state(model, optimizer, tokenizer, cfg, stage, step,
                                 data={**data, "rows_seen": step * cfg.batch_size})
    if rt.is_master:
        training.save_checkpoint(ckpt_path, state)
        log.print(f"saved {ckpt_path} at step {step}")


def train(model, wrapped, optimizer, examples, rows, start_step: int, max_steps: int, save,
          cfg: Config, rt, log) -> None:
    """The steps from start_step: cosine lr, one sft_data.train_step over the step's rows (in
    RowSampler's order), a log line, a checkpoint every save_every steps and at the end."""
    sampler = sft_data.RowSampler(len(rows), cfg.seed)
    model.train()
    step = start_step
    end_step = min(max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else max_steps
    while step < end_step:
        t0 = time.perf_counter()
        lr = training.cosine_lr(step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                total_steps=max_steps, min_lr_ratio=cfg.min_lr_ratio)
        training.set_lr(optimizer, lr)
        step_rows = [rows[sampler.row(step * cfg.batch_size + i)] for i in range(cfg.batch_size)]
        train_loss, tokens, gnorm, n_kept = sft_data.train_step(
            wrapped, optimizer, examples, step_rows, cfg.micro_batch, cfg.grad_clip, cfg.pack, rt)
        step += 1
        if not math.isfinite(train_loss):
            raise SystemExit(f"error: the loss became {train_loss} at step {step}; lower --lr")
        dt = time.perf_counter() - t0
        line = training.step_line(step, max_steps, train_loss, lr, gnorm, dt, tokens / dt)
        log.write({"step": step, "loss": train_loss, "lr": lr, "gnorm": gnorm,
                   "answer_tokens": n_kept, "ms": dt * 1000, "tok_s": tokens / dt},
                  line if step % cfg.log_every == 0 or step == max_steps else None)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end_step:
            save(step)


if __name__ == "__main__":
    main()
    training.end_process()  # under torchrun: no interpreter teardown (see there)
