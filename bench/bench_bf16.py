"""bfloat16 on a CPU that has it (issue 25): the speed targets, measured as ratios in one process.

On a CPU with AMX-BF16 (or AVX512-BF16) this times each bfloat16 path against what it must beat,
the compared variants interleaved round-robin (one call each per round, so background load slows
them alike), medians after warm-up, and prints one table: the two times or rates, the ratio, the
target and whether it is met.
- training step (forward with loss under autocast, backward, clipping at 1.0, AdamW step, as
  bench_train.py; training.clip_and_step), demo and small presets, 16 x 128 random tokens (the
  train_pretrain.py defaults): bfloat16 autocast (training.setup_runtime(dtype="bfloat16"), weights
  float32) >= 2.0x float32. Ratio: median of the rounds' ratios (bench_generate.rates).
- each CPU kernel (RMSNorm, RoPE on q and k, attention) forward+backward in bfloat16 at the demo
  model's shapes (8 x 256 tokens, dim 192, 6 heads / 2 kv heads of 32): >= 1.0x its stock bfloat16
  counterpart (F.rms_norm, Meta's complex RoPE, SDPA with enable_gqa on the (B, H, T, D) layout:
  bench_ops.py's) and >= 1.5x our own kernel in float32. The three run in the same rounds
  (bench_ops.fwd_and_fwdbwd: up to 41 rounds or 4 s); ratio: of the medians, as bench_ops.
- batched greedy decode, batch 32, 32-token random prompts, 64 new tokens, no EOS stop, the demo
  checkpoint (--checkpoint; a random-init demo model if absent, as bench_generate.py): our
  Transformer.generate on the sampler's bfloat16 copy of the weights (sampling.inference_model:
  no autocast, KV cache bfloat16) >= 1.5x ours in float32, and
  >= 1.5x transformers' LlamaForCausalLM.generate in bfloat16 (our llama2.export_hf of the same
  weights, loaded as bench_generate.py loads it, cast to bfloat16, sdpa). Ratio: median of the
  rounds' ratios.
The first lines say what torch reports about the CPU (torch.cpu.get_capabilities) and how many
threads run; without AMX-BF16/AVX512-BF16 bfloat16 is emulated and the targets do not apply.

    python bench/bench_bf16.py --json bench_bf16.json       # about 3 min on 2 cores
    OMP_NUM_THREADS=1 python bench/bench_bf16.py --quick     # smoke run, tiny sizes, < 1 min
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402
import bench_ops  # noqa: E402
import llama2  # noqa: E402
import llama2_kernels as K  # noqa: E402
import sampling  # noqa: E402
import training  # noqa: E402


@dataclass
class Config:
    train_presets: str = "demo,small"  # model shapes of the training-step rows (llama2.PRESETS)
    train_batch: int = 16  # sequences per training step (train_pretrain.py's default)
    train_seq: int = 128  # tokens per sequence (train_pretrain.py's default)
    kernel_preset: str = "demo"  # the kernels' shapes: this preset's dim, heads, kv heads, head_dim
    kernel_batch: int = 8  # sequences per kernel call (bf16_kernel_errors.py's shape)
    kernel_seq: int = 256  # tokens per sequence (the demo context)
    checkpoint: str = "out/demo_sft/sft"  # decode: our checkpoint; a random-init model if absent
    decode_preset: str = "demo"  # decode: the model shape when there is no checkpoint
    decode_batch: int = 32  # decode: prompts per generate call
    prompt_len: int = 32  # decode: random prompt tokens per row
    new_tokens: int = 64  # decode: greedy tokens per row (no EOS stop)
    warmup: int = 2  # untimed rounds first (training steps, generate calls)
    reps: int = 15  # timed rounds of training steps and generate calls (fewer once budget_s is spent)
    budget_s: float = 30.0  # seconds of those rounds per measurement (then at least 3; kernels: bench_ops')
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 0  # seeds the weights, tokens and prompts
    quick: bool = False  # smoke run: tiny batches and lengths, 1 warm-up, 3 rounds (model shapes kept)
    json: str = ""  # also write the results to this JSON file


QUICK = dict(train_batch=2, train_seq=32, kernel_batch=1, kernel_seq=32, decode_batch=4,
             prompt_len=8, new_tokens=8, warmup=1, reps=3, budget_s=1.0)


def row(name: str, ours: float, base_label: str, base: float, unit: str, ratio: float,
        target: float) -> dict:
    """One line of the table: our bfloat16 time or rate against a baseline's, and the target."""
    return {"measurement": name, "bf16": ours, "baseline": base_label, "baseline_value": base,
            "unit": unit, "ratio": ratio, "target": target, "met": ratio >= target}


def bench_training(preset: str, cfg: Config, rt32: training.Runtime,
                   rt16: training.Runtime) -> dict:
    """One training step in float32 and under bfloat16 autocast, the same model and batch."""
    args = llama2.ModelArgs.preset(preset)
    if cfg.train_seq > args.max_seq_len:
        raise SystemExit(f"error: --train_seq {cfg.train_seq} is longer than the {preset} "
                         f"context ({args.max_seq_len})")
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randint(0, args.vocab_size, (2, cfg.train_batch, cfg.train_seq), generator=g)
    tokens = cfg.train_batch * cfg.train_seq

    def make_step(rt):
        torch.manual_seed(cfg.seed)  # the same initial weights for both
        model = llama2.Transformer(args)
        opt = training.make_optimizer(model, lr=1e-4, device_type="cpu")

        def step():
            with rt.autocast():
                _, loss = model(x, y)
            loss.backward()
            training.clip_and_step(model, opt, 1.0)
            return tokens
        return step

    r = bench_generate.rates({"float32": make_step(rt32), "bfloat16": make_step(rt16)},
                             cfg.warmup, cfg.reps, cfg.budget_s)
    ratio = bench_generate.median([b / a for a, b in zip(r["float32"], r["bfloat16"])])
    ms = {k: 1e3 * tokens / bench_generate.median(v) for k, v in r.items()}
    return row(f"train step {preset} {cfg.train_batch}x{cfg.train_seq}", ms["bfloat16"],
               "float32", ms["float32"], "ms", ratio, 2.0) | {"rounds": len(r["float32"])}


def bench_kernels(cfg: Config) -> list:
    """RMSNorm, RoPE (q and k) and attention, forward+backward: ours in bfloat16 against stock
    PyTorch in bfloat16 and ours in float32, the three in the same rounds."""
    a = llama2.ModelArgs.preset(cfg.kernel_preset)
    B, T, C, H, KV, D = cfg.kernel_batch, cfg.kernel_seq, a.dim, a.n_heads, a.n_kv_heads, a.head_dim
    eps, cpu = a.norm_eps, torch.device("cpu")
    torch.manual_seed(cfg.seed)
    rows = []

    def compare(name, contenders):
        t = {k: fb for k, (_, fb) in bench_ops.fwd_and_fwdbwd(contenders, cpu).items()}
        ours = t["ours bf16"]
        for base, target in ((next(k for k in t if k.startswith("stock")), 1.0), ("ours float32", 1.5)):
            rows.append(row(name, ours, base, t[base], "ms", t[base] / ours, target))

    # RMSNorm over x (B, T, C); weight in the activations' dtype, as bench_ops
    x32, w32 = torch.randn(B, T, C), 1 + 0.5 * torch.randn(C)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    compare(f"rms_norm fwd+bwd ({B}, {T}, {C})", {
        "ours bf16": (lambda x, w: K.rms_norm(x, w, eps), (x16, w16)),
        "stock F.rms_norm bf16": (lambda x, w: F.rms_norm(x, (C,), w, eps), (x16, w16)),
        "ours float32": (lambda x, w: K.rms_norm(x, w, eps), (x32, w32)),
    })

    # RoPE on q (B, T, H, D) and k (B, T, KV, D), float32 tables (as the model keeps them)
    q32, k32 = torch.randn(B, T, H, D), torch.randn(B, T, KV, D)
    cos, sin = llama2.rope_table(D, 2 * T)
    pos = torch.arange(T).expand(B, T)
    freqs_cis = torch.polar(torch.ones_like(cos[:T]), torch.atan2(sin[:T], cos[:T]))  # (T, D/2)
    ours_rope = lambda q, k: (K.rope(q, pos, cos, sin), K.rope(k, pos, cos, sin))  # noqa: E731
    compare(f"rope fwd+bwd q({B}, {T}, {H}, {D}) k {KV} heads", {
        "ours bf16": (ours_rope, (q32.bfloat16(), k32.bfloat16())),
        "stock Meta RoPE bf16": (lambda q, k: bench_ops.meta_rope(q, k, freqs_cis),
                                 (q32.bfloat16(), k32.bfloat16())),
        "ours float32": (ours_rope, (q32, k32)),
    })

    # causal GQA attention; stock SDPA on its own (B, H, T, D) layout
    qkv32 = bench_ops.attention_inputs(B, T, H, KV, D, cpu, torch.float32, seed=cfg.seed)
    qkv16 = tuple(t.bfloat16() for t in qkv32)
    qkv16_t = tuple(t.transpose(1, 2).contiguous() for t in qkv16)
    compare(f"attention fwd+bwd B{B} T{T} H{H} KV{KV} D{D}", {
        "ours bf16": (lambda q, k, v: K.attention(q, k, v), qkv16),
        "stock SDPA(enable_gqa) bf16": (lambda q, k, v: bench_ops.sdpa_bhtd(q, k, v), qkv16_t),
        "ours float32": (lambda q, k, v: K.attention(q, k, v), qkv32),
    })
    return rows


def bench_decode(cfg: Config, rt16: training.Runtime) -> tuple[list, str]:
    """Greedy batched generate: ours in bfloat16 against ours in float32 and transformers in
    bfloat16, on the same weights, the three in the same rounds."""
    gcfg = bench_generate.Config(checkpoint=cfg.checkpoint, preset=cfg.decode_preset,
                                 prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, seed=cfg.seed)
    model32, tokenizer, source = bench_generate.load_ours(gcfg)
    if cfg.prompt_len + cfg.new_tokens > model32.args.max_seq_len:
        raise SystemExit(f"error: --prompt_len + --new_tokens = {cfg.prompt_len + cfg.new_tokens} "
                         f"is longer than the context ({model32.args.max_seq_len})")
    # the sampler's bfloat16 path (sampling.inference_model): a bfloat16 copy of the weights,
    # no autocast; each model keeps its own KV cache between calls
    model16 = sampling.inference_model(model32, rt16)
    hf = bench_generate.load_theirs(model32, "sdpa").to(torch.bfloat16)
    B, N = cfg.decode_batch, cfg.new_tokens
    prompts = bench_generate.make_prompts(model32, tokenizer, B, gcfg)
    ids = torch.tensor(prompts)  # all cfg.prompt_len long: no padding

    def ours32():
        return sum(map(len, model32.generate(prompts, N, temperature=0.0, eos_id=None)))

    def ours16():
        return sum(map(len, model16.generate(prompts, N, temperature=0.0, eos_id=None)))

    def theirs16():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                              min_new_tokens=N, do_sample=False, temperature=None, top_p=None,
                              top_k=None)
        return out[:, ids.shape[1]:].numel()

    r = bench_generate.rates({"ours float32": ours32, "ours bf16": ours16,
                              "transformers bf16": theirs16}, cfg.warmup, cfg.reps, cfg.budget_s)
    ours = bench_generate.median(r["ours bf16"])
    rows = []
    for base in ("ours float32", "transformers bf16"):
        ratio = bench_generate.median([a / b for a, b in zip(r["ours bf16"], r[base])])
        rows.append(row(f"decode batch {B}, {cfg.prompt_len}+{N} tokens", ours, base,
                        bench_generate.median(r[base]), "tok/s", ratio, 1.5)
                    | {"rounds": len(r[base])})
    model32.free_cache()
    model16.free_cache()
    return rows, source


def fmt(value: float, unit: str) -> str:
    return f"{value:,.0f} tok/s" if unit == "tok/s" else f"{value:.2f} ms"


def print_table(rows: list) -> None:
    w = max(len(r["measurement"]) for r in rows)
    wb = max(len(r["baseline"]) + 1 + len(fmt(r["baseline_value"], r["unit"])) for r in rows)
    print(f"{'measurement':<{w}} | {'ours bf16':>13} | {'against':<{wb}} | {'ratio':>6} | "
          f"{'target':>7} | met")
    for r in rows:
        base = f"{r['baseline']} {fmt(r['baseline_value'], r['unit'])}"
        print(f"{r['measurement']:<{w}} | {fmt(r['bf16'], r['unit']):>13} | {base:<{wb}} | "
              f"{r['ratio']:5.2f}x | >= {r['target']:.1f}x | {'yes' if r['met'] else 'NO'}",
              flush=True)


def main(argv=None) -> dict:
    cfg = training.parse_config(Config, argv, description=__doc__)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if not K.AVAILABLE:
        raise SystemExit("bench_bf16: the llama2_C extension is not built; run "
                         "`pip install --no-build-isolation -e .` first")
    import transformers
    caps = training.cpu_capabilities()
    auto, why = training.auto_dtype("cpu", False, caps)
    print(f"cpu: {caps.get('cpu_name', '?')}; torch.cpu.get_capabilities(): "
          + ", ".join(f"{k}={caps.get(k)}" for k in ("amx_bf16", "amx_tile", "avx512_bf16",
                                                    "avx512_f", "avx2"))
          + f"; --dtype auto -> {auto} ({why})")
    if auto != "bfloat16":
        print("warning: bfloat16 is emulated on this CPU; the targets assume AMX-BF16 or AVX512-BF16")
    rt32 = training.setup_runtime("cpu", "float32", seed=cfg.seed, threads=cfg.threads)
    rt16 = training.setup_runtime("cpu", "bfloat16", seed=cfg.seed)
    threads = torch.get_num_threads()
    print(f"threads: {threads} (torch.get_num_threads(); OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), kernels {llama2.kernels_in_use()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}"
          + (", --quick (tiny sizes, 3 rounds: not a measurement)" if cfg.quick else ""), flush=True)

    rows = [bench_training(p, cfg, rt32, rt16) for p in cfg.train_presets.split(",") if p]
    rows += bench_kernels(cfg)
    decode_rows, source = bench_decode(cfg, rt16)
    rows += decode_rows
    print(f"decode weights: {source}")
    print_table(rows)
    met = sum(r["met"] for r in rows)
    print(f"{met}/{len(rows)} targets met")
    summary = {"config": dataclasses.asdict(cfg), "cpu_capabilities": caps, "auto_dtype": auto,
               "threads": threads, "kernels": llama2.kernels_in_use(), "torch": torch.__version__,
               "transformers": transformers.__version__, "decode_weights": source, "rows": rows}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
