"""Greedy-token agreement of bfloat16 autocast with float32 on a chat checkpoint (issue 25).

The stages sample under the runtime's autocast (sampling.generate_replies), so on a CPU with
AMX-BF16/AVX512-BF16 they now sample in bfloat16, with the KV cache in bfloat16. This measures
what that changes: held-out prompts (world.eval_prompts, levels 1-2, rendered with the chat format
as the stages render them) are answered greedily in float32; then
- teacher-forced: the bfloat16 model reads each prompt + float32 reply in one forward pass, and
  a position agrees when its argmax is the float32 model's token (the same prefix for both, so
  this is the per-step agreement; the issue asks >= 95%);
- free-running: the bfloat16 model generates its own greedy replies (batched, KV cache in
  bfloat16); a position agrees when both replies hold the same token there (after a first
  difference the two replies usually part for good), and whole replies that are identical; and
  both sets of replies judged (world.score, as evaluate.py's greedy score): the mean of each and
  the paired difference with its standard error.
On a CPU without bfloat16 hardware the bfloat16 matmuls are emulated (slow; the numbers are the
same): use fewer prompts there.

    OMP_NUM_THREADS=1 python bench/bf16_agreement.py --checkpoint out/pipeline_mixed/sft --n 200
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama2  # noqa: E402
import sampling  # noqa: E402
import training  # noqa: E402
import world  # noqa: E402


@dataclass
class Config:
    checkpoint: str = "out/pipeline_mixed/sft"  # a chat (SFT) checkpoint: its folder or ckpt.pt
    n: int = 200  # held-out prompts (world.eval_prompts, split heldout, levels 1-2)
    max_new_tokens: int = 48  # reply length cap, as the stages' evaluation
    batch: int = 64  # prompts per generate call
    free_running: bool = True  # also generate bfloat16 replies (the slow part on emulated bf16)
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 0  # seed of world.eval_prompts


def greedy(model, prompts, cfg, eos_id, dtype):
    """Greedy replies (token lists, EOS kept) under autocast `dtype` (float32: none), batched by
    length as sampling.generate_replies batches them."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with ctx:
        for c in range(0, len(order), cfg.batch):
            idx = order[c:c + cfg.batch]
            gens = model.generate([prompts[i] for i in idx], cfg.max_new_tokens, temperature=0.0,
                                  eos_id=eos_id)
            for i, g in zip(idx, gens):
                out[i] = g
    model.free_cache()
    return out


@torch.inference_mode()
def teacher_forced(model, prompts, replies, dtype):
    """Per prompt: (agreeing positions, positions) of argmax under `dtype` against `replies`."""
    agree = total = 0
    for p, r in zip(prompts, replies):
        if not r:
            continue
        seq = torch.tensor([p + r[:-1]])
        with torch.autocast("cpu", dtype=dtype):
            logits, _ = model(seq)
        pred = logits[0, len(p) - 1:].argmax(-1)  # (len(r),) the token after each prefix
        agree += int((pred == torch.tensor(r)).sum())
        total += len(r)
    return agree, total


def judged(dialogs, replies, tok):
    """world.score of each greedy reply, cleaned as sampling.generate_replies cleans it."""
    out = []
    for d, g in zip(dialogs, replies):
        eos = bool(g) and g[-1] == tok.eos_id
        text = sampling.clean_reply(tok.decode(g[:-1] if eos else g))
        out.append(world.score(d, text, eos).total)
    return out


def main():
    cfg = training.parse_config(Config, description=__doc__)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    caps = training.cpu_capabilities()
    print(f"cpu: {caps.get('cpu_name', '?')}, amx_bf16={caps.get('amx_bf16')}, "
          f"avx512_bf16={caps.get('avx512_bf16')}, {torch.get_num_threads()} threads, "
          f"kernels {llama2.kernels_in_use()}")
    model, tok = llama2.load_model(cfg.checkpoint)
    model.eval()
    dialogs = world.eval_prompts(cfg.n, seed=cfg.seed, split="heldout", levels=(1, 2))
    encoded = [llama2.encode_dialog(tok, d)[0] for d in dialogs]
    keep = [i for i, p in enumerate(encoded) if len(p) < model.args.max_seq_len - 1]
    dialogs, prompts = [dialogs[i] for i in keep], [encoded[i] for i in keep]
    print(f"{len(prompts)} held-out prompts, {sum(map(len, prompts)) / len(prompts):.0f} tokens "
          f"on average, up to {cfg.max_new_tokens} new tokens")

    t0 = time.perf_counter()
    ref = greedy(model, prompts, cfg, tok.eos_id, torch.float32)
    print(f"float32 greedy: {sum(map(len, ref))} tokens in {time.perf_counter() - t0:.0f}s")

    t0 = time.perf_counter()
    agree, total = teacher_forced(model, prompts, ref, torch.bfloat16)
    print(f"teacher-forced: bfloat16 argmax = float32 token at {agree}/{total} positions "
          f"= {100 * agree / total:.2f}% ({time.perf_counter() - t0:.0f}s)")

    if cfg.free_running:
        t0 = time.perf_counter()
        low = greedy(model, prompts, cfg, tok.eos_id, torch.bfloat16)
        assert model.layers[0].attention.cache_k is None  # freed; it was bfloat16 (tests check)
        same = sum(sum(a == b for a, b in zip(r, l)) for r, l in zip(ref, low))
        pos = sum(max(len(r), len(l)) for r, l in zip(ref, low))
        whole = sum(r == l for r, l in zip(ref, low))
        print(f"free-running: same token at {same}/{pos} positions = {100 * same / pos:.2f}%; "
              f"identical replies {whole}/{len(prompts)} = {100 * whole / len(prompts):.1f}% "
              f"({time.perf_counter() - t0:.0f}s)")
        a, b = judged(dialogs, ref, tok), judged(dialogs, low, tok)
        diff = [y - x for x, y in zip(a, b)]
        mean = sum(diff) / len(diff)
        se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff))
        print(f"judged greedy score: float32 {sum(a) / len(a):.4f}, bfloat16 {sum(b) / len(b):.4f}, "
              f"paired difference {mean:+.4f} +- {se:.4f} (standard error)")


if __name__ == "__main__":
    main()
