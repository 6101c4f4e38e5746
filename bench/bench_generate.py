"""Batched generation throughput: our Transformer.generate against Hugging Face transformers'
LlamaForCausalLM.generate on the same weights, in one process.

Sampling is what the RLHF stages spend their time on, so this times a whole `generate` call
(prefill of the prompts, then one decode step per new token) at several batch sizes, with no EOS
stop so every row makes exactly --new_tokens tokens. The weights are the demo checkpoint
(--checkpoint, if it exists) or a random-init model of the demo shape; transformers loads them
from our Hugging Face export (llama2.export_hf) in float32. Both run round-robin, one call each
per round, after warm-up: tokens/s = batch * new_tokens / median seconds, and the ratio ours /
transformers is the median of the rounds' ratios. Greedy (the default), both must make the same
tokens (float32 on CPU: they agree; a mismatch is reported with the first row and step where they
part). With --temperature > 0 both sample from the same distribution, but not the same random
stream, so only the speed is compared (train_rlhf's setting: --temperature 0.7 --top_p 1.0).

    OMP_NUM_THREADS=1 python bench/bench_generate.py                 # CPU, about 2 min
    python bench/bench_generate.py --batch_sizes 32,64 --new_tokens 128 --json gen.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama2  # noqa: E402
import training  # noqa: E402


@dataclass
class Config:
    checkpoint: str = "out/demo_sft/sft"  # our checkpoint to load; a random-init demo model if absent
    preset: str = "demo"  # model shape when there is no checkpoint (llama2.PRESETS)
    batch_sizes: str = "1,8,32,64"  # prompts per generate call
    prompt_len: int = 32  # tokens per prompt (random ids, all the same length)
    new_tokens: int = 64  # tokens generated per row
    temperature: float = 0.0  # 0 = greedy (tokens checked); > 0 times sampling instead (RLHF: 0.7)
    top_p: float = 1.0  # nucleus for sampling (train_rlhf's default 1.0 = pure sampling)
    reps: int = 7  # timed rounds (fewer once budget_s is spent, at least 3)
    budget_s: float = 20.0  # time budget per batch size for the timed rounds
    warmup: int = 1  # untimed rounds first
    attn: str = "sdpa"  # transformers' attention implementation: sdpa or eager
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 0  # seeds the random weights and prompts
    json: str = ""  # also write the results to this JSON file


def load_ours(cfg: Config) -> tuple[llama2.Transformer, str]:
    """Our model in eval mode, float32 on the CPU, and where its weights came from."""
    if os.path.exists(cfg.checkpoint):
        model, _ = llama2.load_model(cfg.checkpoint)
        return model.float().eval(), cfg.checkpoint
    torch.manual_seed(cfg.seed)
    model = llama2.Transformer(llama2.ModelArgs.preset(cfg.preset)).eval()
    return model, f"random init ({cfg.preset} preset; no checkpoint at {cfg.checkpoint})"


def load_theirs(model: llama2.Transformer, attn: str):
    """transformers' LlamaForCausalLM with our weights, through our Hugging Face export."""
    import transformers
    with tempfile.TemporaryDirectory() as d:
        llama2.export_hf(model, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                           attn_implementation=attn).eval()
    # Exactly new_tokens per row: no EOS stop (ours gets eos_id=None too).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


def times_s(fns: dict, warmup: int, reps: int, budget_s: float) -> dict:
    """Wall seconds of each fn per round, run round-robin so a busy machine slows them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    t_start = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if time.perf_counter() - t_start > budget_s and len(times[name]) >= 3:
            break
    return times


def first_mismatch(ours: list, theirs: torch.Tensor):
    """(row, step) where our greedy tokens first differ from transformers', or None."""
    for i, row in enumerate(ours):
        ref = theirs[i].tolist()
        for t in range(max(len(row), len(ref))):
            if t >= len(row) or t >= len(ref) or row[t] != ref[t]:
                return i, t
    return None


def bench_batch(model, hf, B: int, cfg: Config) -> dict:
    g = torch.Generator().manual_seed(cfg.seed + B)
    prompts = torch.randint(0, model.args.vocab_size, (B, cfg.prompt_len), generator=g)
    prompt_lists = prompts.tolist()
    mask = torch.ones_like(prompts)
    N = cfg.new_tokens

    greedy = cfg.temperature <= 0
    # Sampling: the same distribution on both sides (top_k=0 turns off transformers' default
    # top-50), but not the same random stream, so only greedy tokens can be compared.
    sampling = (dict(do_sample=False, temperature=None, top_p=None, top_k=None) if greedy else
                dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0))

    def ours():
        return model.generate(prompt_lists, max_new_tokens=N, temperature=cfg.temperature,
                              top_p=cfg.top_p, seed=cfg.seed, eos_id=None)

    def theirs():
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                              **sampling)
        return out[:, cfg.prompt_len:]

    bad = first_mismatch(ours(), theirs()) if greedy else None
    t = times_s({"ours": ours, "transformers": theirs}, cfg.warmup, cfg.reps, cfg.budget_s)
    # The ratio is the median of each round's ratio: the two calls of a round ran back to back,
    # under the same load, which a shared machine changes from round to round.
    ratio = median([b / a for a, b in zip(t["ours"], t["transformers"])])
    return {"batch": B, "ours_tok_s": B * N / median(t["ours"]),
            "transformers_tok_s": B * N / median(t["transformers"]), "ratio": ratio, "same_greedy_tokens": bad is None if greedy else None,
            "first_mismatch": bad}


def main(argv=None) -> dict:
    cfg = training.parse_config(Config, argv, description=__doc__)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, source = load_ours(cfg)
    if cfg.prompt_len + cfg.new_tokens > model.args.max_seq_len:
        raise SystemExit(f"error: --prompt_len + --new_tokens = {cfg.prompt_len + cfg.new_tokens} "
                         f"is longer than the context ({model.args.max_seq_len})")
    hf = load_theirs(model, cfg.attn)
    import transformers
    print(f"{model.num_params() / 1e6:.1f}M parameters ({source}), float32, CPU, "
          f"{torch.get_num_threads()} threads, kernels {llama2.kernels_in_use()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__} ({cfg.attn})")
    mode = "greedy" if cfg.temperature <= 0 else f"sampling (temperature {cfg.temperature}, top_p {cfg.top_p})"
    print(f"{mode}, prompt {cfg.prompt_len} tokens, {cfg.new_tokens} new tokens per row, "
          f"median of up to {cfg.reps} rounds after {cfg.warmup} warm-up")
    print(f"{'batch':>5} | {'ours tok/s':>11} | {'transformers tok/s':>18} | {'ours/tf':>7} | same tokens")
    results = []
    for B in [int(b) for b in cfg.batch_sizes.split(",") if b]:
        r = bench_batch(model, hf, B, cfg)
        results.append(r)
        same = ("n/a (sampled)" if r["same_greedy_tokens"] is None else "yes" if r["same_greedy_tokens"]
                else "NO: row {}, step {}".format(*r["first_mismatch"]))
        print(f"{B:>5} | {r['ours_tok_s']:>11,.0f} | {r['transformers_tok_s']:>18,.0f} | "
              f"{r['ratio']:>6.2f}x | {same}", flush=True)
    summary = {"config": dataclasses.asdict(cfg), "model": source, "n_params": model.num_params(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "results": results}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
