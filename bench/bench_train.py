"""Training throughput of one model shape, with the extension's kernels and with the reference
path, measured in one process so the two numbers are comparable.

A training step here is what train_pretrain.py does per micro-batch: forward with loss under
autocast, backward, gradient clipping, AdamW step. Tokens are random (throughput does not depend
on them). Model FLOPs utilization (MFU) is the model's training FLOPs per second (6N + 12 L d T
per token, see training.model_flops_per_token) divided by the matmul rate measured on this device
in the same dtype, so it says how much of the attainable matmul speed the whole step reaches.

    python bench/bench_train.py --preset demo --batch_size 16 --seq_len 128      # CPU
    python bench/bench_train.py --preset small --device cuda --batch_size 32 --seq_len 512
    python bench/bench_train.py --preset llama2-7b --n_layers 4 --device cuda --batch_size 4 \\
        --seq_len 4096 --json bench_7b4.json
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama2  # noqa: E402
import training  # noqa: E402


@dataclass
class Config:
    preset: str = "demo"  # model shape from llama2.PRESETS
    n_layers: int = 0  # override the preset's depth (0 = keep), e.g. a few 7B layers on one GPU
    batch_size: int = 16  # sequences per step
    seq_len: int = 0  # tokens per sequence (0 = the preset's max_seq_len)
    steps: int = 5  # timed steps per path
    warmup: int = 2  # untimed steps first (allocator, caches, compilation)
    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "auto"  # autocast: auto (bfloat16 on a GPU or a CPU with AMX-BF16 or AVX512-BF16, else float32), float32, bfloat16
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU threads (0 = torch's default)
    paths: str = "ext,ref"  # which hot-path implementations to time, in this order
    json: str = ""  # also write the results to this JSON file


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul FLOP/s for (n x n) @ (n x n) in `dtype` on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_path(path: str, cfg: Config, rt: training.Runtime, args: llama2.ModelArgs,
               seq_len: int) -> dict:
    """Build a fresh model with `path`'s kernels, time cfg.steps training steps."""
    llama2.set_kernels(path)
    torch.manual_seed(0)
    with torch.device(rt.device):
        model = llama2.Transformer(args)
    opt = training.make_optimizer(model, lr=1e-4, device_type=rt.device_type)
    step_model = torch.compile(model) if cfg.compile else model
    x = torch.randint(0, args.vocab_size, (cfg.batch_size, seq_len), device=rt.device)
    y = torch.randint(0, args.vocab_size, (cfg.batch_size, seq_len), device=rt.device)
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)

    def step():
        with rt.autocast():
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(cfg.warmup):
        step()
    sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        loss = step()
    sync(rt.device)
    dt = (time.perf_counter() - t0) / cfg.steps
    out = {"path": path, "step_ms": dt * 1000, "tokens_per_s": cfg.batch_size * seq_len / dt,
           "loss": loss.item()}
    if rt.device_type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(rt.device) / 1e9
    del model, opt, step_model
    return out


def main(argv=None) -> dict:
    cfg = training.parse_config(Config, argv, description=__doc__)
    rt = training.setup_runtime(cfg.device, cfg.dtype, seed=0, threads=cfg.threads)
    overrides = {"n_layers": cfg.n_layers} if cfg.n_layers else {}
    args = llama2.ModelArgs.preset(cfg.preset, **overrides)
    seq_len = cfg.seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise SystemExit(f"error: --seq_len {seq_len} is longer than the preset's context "
                         f"({args.max_seq_len})")
    n_params = llama2.count_params(args)
    flops_tok = training.model_flops_per_token(n_params, args.n_layers, args.dim, seq_len)
    # the matmul rate in the dtype the step's matmuls run in (autocast dtype, or float32)
    mm_dtype = rt.dtype
    peak = matmul_rate(rt.device, mm_dtype, 8192 if rt.device_type == "cuda" else 1024)

    paths = [p for p in cfg.paths.split(",") if p]
    results = []
    for path in paths:
        try:
            r = bench_path(path, cfg, rt, args, seq_len)
        except RuntimeError as e:  # e.g. the extension is not built
            print(f"{path}: skipped ({e})")
            continue
        r["mfu"] = r["tokens_per_s"] * flops_tok / peak
        results.append(r)

    where = (torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{cfg.preset}{f' ({cfg.n_layers} layers)' if cfg.n_layers else ''}: "
          f"{n_params / 1e6:.1f}M parameters, batch {cfg.batch_size} x {seq_len}, {where}, "
          f"autocast {str(rt.dtype).replace('torch.', '')}"
          + (", compiled" if cfg.compile else ""))
    print(f"measured matmul rate ({str(mm_dtype).replace('torch.', '')}): "
          f"{peak / 1e12:.2f} TFLOP/s; model FLOPs/token {flops_tok / 1e6:.1f}M")
    for r in results:
        mem = f" | peak mem {r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else ""
        print(f"  {r['path']:>3}: {r['tokens_per_s']:>12,.0f} tok/s | {r['step_ms']:8.1f} ms/step"
              f" | MFU {100 * r['mfu']:5.1f}%{mem}")
    summary = {"config": dataclasses.asdict(cfg), "device": where, "n_params": n_params,
               "matmul_flops": peak, "flops_per_token": flops_tok, "results": results}
    by = {r["path"]: r for r in results}
    if "ext" in by and "ref" in by:
        summary["ext_over_ref"] = by["ext"]["tokens_per_s"] / by["ref"]["tokens_per_s"]
        print(f"  ext / ref: {summary['ext_over_ref']:.2f}x")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
