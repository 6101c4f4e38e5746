"""Batched generation throughput: our Transformer.generate against Hugging Face transformers'
LlamaForCausalLM.generate on the same weights, in one process.

Sampling is what the RLHF stages spend their time on, so this times a whole `generate` call
(prefill of the prompts, then one decode step per new token) at several batch sizes, with no EOS
stop so every row makes exactly --new_tokens tokens. The weights are the demo checkpoint
(--checkpoint, if it exists) or a random-init model of the demo shape; transformers loads them
from our Hugging Face export (llama2.export_hf) in float32. Both run round-robin, one call each
per round, after warm-up: tokens/s = batch * new_tokens / seconds (median), and the ratio ours /
transformers is the median of the rounds' ratios. Greedy (the default), both must make the same
tokens (float32 on CPU: they agree; a mismatch is reported with the first row and step where they
part). With --temperature > 0 both sample from the same distribution, but not the same random
stream, so only the speed is compared (train_rlhf's setting: --temperature 0.7 --top_p 1.0).
With --chat the prompts are RLHF prompt dialogs (world.chat_prompts, encoded with the checkpoint's
tokenizer) of similar length, as sampling.generate_replies batches them, and rows stop at EOS; then
tokens/s counts the tokens each side made, EOS included.

    OMP_NUM_THREADS=1 python bench/bench_generate.py                 # CPU, about 2 min
    OMP_NUM_THREADS=1 python bench/bench_generate.py --chat --temperature 0.7 --top_p 1.0
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
    chat: bool = False  # RLHF-like prompts instead: world.chat_prompts of similar length, EOS stop
    seed: int = 0  # seeds the random weights and prompts
    json: str = ""  # also write the results to this JSON file


def load_ours(cfg: Config):
    """Our model in eval mode, float32 on the CPU, its tokenizer (or None), where it came from."""
    if os.path.exists(cfg.checkpoint):
        model, tokenizer = llama2.load_model(cfg.checkpoint)
        return model.float().eval(), tokenizer, cfg.checkpoint
    torch.manual_seed(cfg.seed)
    model = llama2.Transformer(llama2.ModelArgs.preset(cfg.preset)).eval()
    return model, None, f"random init ({cfg.preset} preset; no checkpoint at {cfg.checkpoint})"


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


def rates(fns: dict, warmup: int, reps: int, budget_s: float) -> dict:
    """Tokens/s of each fn (which returns how many tokens it made) per round, run round-robin so
    a busy machine slows them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: [] for name in fns}
    t_start = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            n = fn()
            out[name].append(n / (time.perf_counter() - t))
        if time.perf_counter() - t_start > budget_s and len(out[name]) >= 3:
            break
    return out


def first_mismatch(ours: list, theirs: list):
    """(row, step) where our greedy tokens first differ from transformers', or None."""
    for i, (row, ref) in enumerate(zip(ours, theirs)):
        for t in range(max(len(row), len(ref))):
            if t >= len(row) or t >= len(ref) or row[t] != ref[t]:
                return i, t
    return None


def make_prompts(model, tokenizer, B: int, cfg: Config) -> list:
    """B prompts: random ids of --prompt_len, or (--chat) RLHF prompt dialogs, B of similar
    length from the middle of a length-sorted set (as sampling.generate_replies batches them)."""
    g = torch.Generator().manual_seed(cfg.seed + B)
    if not cfg.chat:
        return torch.randint(0, model.args.vocab_size, (B, cfg.prompt_len), generator=g).tolist()
    import world
    dialogs = world.chat_prompts(4 * B, "train", seed=cfg.seed)
    prompts = sorted((llama2.encode_dialog(tokenizer, d)[0] for d in dialogs), key=len)
    return prompts[len(prompts) // 2 - B // 2:][:B]


def bench_batch(model, hf, tokenizer, B: int, cfg: Config) -> dict:
    prompts = make_prompts(model, tokenizer, B, cfg)
    # transformers takes a (B, P) grid: shorter prompts padded on the left, masked out.
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    N = cfg.new_tokens
    eos = tokenizer.eos_id if cfg.chat else None
    greedy = cfg.temperature <= 0
    # Sampling: the same distribution on both sides (top_k=0 turns off transformers' default
    # top-50), but not the same random stream, so only greedy tokens can be compared.
    sampling = (dict(do_sample=False, temperature=None, top_p=None, top_k=None) if greedy else
                dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0))
    # Without EOS every row makes exactly N tokens; with it a row ends at its EOS (counted).
    lengths = dict(eos_token_id=eos) if cfg.chat else dict(min_new_tokens=N)
    made = {}

    def ours():
        made["ours"] = model.generate(prompts, max_new_tokens=N, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seed=cfg.seed, eos_id=eos)
        return sum(len(r) for r in made["ours"])

    def theirs():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=N, **lengths, **sampling)
        rows = out[:, P:].tolist()
        if eos is not None:  # cut each row after its EOS (transformers pads the finished rows)
            rows = [r[:r.index(eos) + 1] if eos in r else r for r in rows]
        made["theirs"] = rows
        return sum(len(r) for r in rows)

    ours(), theirs()
    bad = first_mismatch(made["ours"], made["theirs"]) if greedy else None
    r = rates({"ours": ours, "transformers": theirs}, cfg.warmup, cfg.reps, cfg.budget_s)
    # The ratio is the median of each round's ratio: the two calls of a round ran back to back,
    # under the same load, which a shared machine changes from round to round.
    ratio = median([a / b for a, b in zip(r["ours"], r["transformers"])])
    return {"batch": B, "prompt_tokens": [min(map(len, prompts)), P],
            "new_tokens_per_row": sum(map(len, made["ours"])) / B,
            "ours_tok_s": median(r["ours"]), "transformers_tok_s": median(r["transformers"]),
            "ratio": ratio, "same_greedy_tokens": bad is None if greedy else None,
            "first_mismatch": bad}


def main(argv=None) -> dict:
    cfg = training.parse_config(Config, argv, description=__doc__)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, source = load_ours(cfg)
    if cfg.chat and tokenizer is None:
        raise SystemExit(f"error: --chat needs a checkpoint with its tokenizer; none at {cfg.checkpoint}")
    if not cfg.chat and cfg.prompt_len + cfg.new_tokens > model.args.max_seq_len:
        raise SystemExit(f"error: --prompt_len + --new_tokens = {cfg.prompt_len + cfg.new_tokens} "
                         f"is longer than the context ({model.args.max_seq_len})")
    hf = load_theirs(model, cfg.attn)
    import transformers
    print(f"{model.num_params() / 1e6:.1f}M parameters ({source}), float32, CPU, "
          f"{torch.get_num_threads()} threads, kernels {llama2.kernels_in_use()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__} ({cfg.attn})")
    mode = "greedy" if cfg.temperature <= 0 else f"sampling (temperature {cfg.temperature}, top_p {cfg.top_p})"
    prompts = (f"chat prompts (world.chat_prompts), stop at EOS or {cfg.new_tokens} new tokens"
               if cfg.chat else f"prompt {cfg.prompt_len} random tokens, {cfg.new_tokens} new tokens per row")
    print(f"{mode}, {prompts}, median of up to {cfg.reps} rounds after {cfg.warmup} warm-up")
    print(f"{'batch':>5} | {'prompt':>7} | {'new/row':>7} | {'ours tok/s':>10} | {'transformers tok/s':>18} "
          f"| {'ours/tf':>7} | same tokens")
    results = []
    for B in [int(b) for b in cfg.batch_sizes.split(",") if b]:
        r = bench_batch(model, hf, tokenizer, B, cfg)
        results.append(r)
        same = ("n/a (sampled)" if r["same_greedy_tokens"] is None else "yes" if r["same_greedy_tokens"]
                else "NO: row {}, step {}".format(*r["first_mismatch"]))
        lo, hi = r["prompt_tokens"]
        print(f"{B:>5} | {f'{lo}-{hi}' if lo != hi else lo:>7} | {r['new_tokens_per_row']:>7.1f} | "
              f"{r['ours_tok_s']:>10,.0f} | {r['transformers_tok_s']:>18,.0f} | {r['ratio']:>6.2f}x | {same}",
              flush=True)
    summary = {"config": dataclasses.asdict(cfg), "model": source, "n_params": model.num_params(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "results": results}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
