"""Batched chat sampling, what every stage that samples replies uses: evaluation (evaluate.py),
Ghost Attention's data (gatt.py), the reward model's preference pairs (train_rm.py) and
rejection sampling (train_rlhf.py).

  Reply             one sampled reply: its text (EOS removed, cut at a chat tag), whether it
                    ended with EOS, how many tokens it took
  clean_reply       cut a generated text at the first chat tag (a model writing one starts a turn)
  generate_replies  n replies to each dialog, batched with the KV cache, prompts sorted by length

PPO's rollouts (train_rlhf.rollout) sample token ids instead of text, at top_p 1.0, and keep
the ids the policy produced; they call llama2.Transformer.generate directly.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

import llama2
import training


@dataclass
class Reply:
    text: str      # the reply, EOS removed, cut at a chat tag (a model writing one starts a turn)
    eos: bool      # ended with EOS (rather than hitting max_new_tokens)
    n_tokens: int  # generated tokens, EOS included


_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def clean_reply(text: str, stop_at_newline: bool = False) -> str:
    """Cut a generated text at the first chat tag (and, for a base model, at the first newline),
    so that it can go back into a dialog as an assistant message."""
    cut = len(text)
    for s in _TAGS + (("\n",) if stop_at_newline else ()):
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def inference_model(model, rt: training.Runtime | None):
    """The model sampling runs on: under bfloat16 autocast on a CPU, a bfloat16 copy of its
    weights; else the model itself. Autocast keeps the weights float32 and casts them again for
    every matmul of every decode step: at the demo size that made decoding slower than float32
    (0.7-0.9x), the copy faster (about 1.4x; BENCHMARKS.md, issue 25). Logits are still
    upcast to float32 before sampling (Transformer.generate). A model whose weights are already
    bfloat16 (e.g. a checkpoint loaded with dtype=torch.bfloat16) is used as it is: no copy."""
    if (rt is None or rt.dtype != torch.bfloat16 or rt.device_type != "cpu"
            or model.output.weight.dtype == torch.bfloat16):
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


def generate_replies(model, tokenizer, dialogs: list[list[dict]], *, n: int = 1,
                     temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: int = 48,
                     seed: int = 0, batch: int = 64, stop_at_newline: bool = False,
                     rt: training.Runtime | None = None, desc: str = "sampling"
                     ) -> list[list[Reply] | None]:
    """n replies to each dialog (ending with a user message), batched; temperature 0 is greedy.

    A dialog whose prompt leaves no room in the context gets None. Prompts are sorted by length
    before batching, since a batch costs (longest - shortest prompt + new tokens) decoding steps.
    """
    max_len = model.args.max_seq_len
    prompts = [llama2.encode_dialog(tokenizer, d)[0] for d in dialogs]
    jobs = sorted(((len(p), i, j) for i, p in enumerate(prompts) if len(p) < max_len - 1
                   for j in range(n)))
    out: list[list[Reply] | None] = [None if len(p) >= max_len - 1 else [None] * n
                                     for p in prompts]
    gen = inference_model(model, rt)  # a bfloat16 copy needs no autocast
    autocast = rt.autocast() if rt is not None and gen is model else contextlib.nullcontext()
    model = gen
    model.eval()
    bar = training.progress(total=len(jobs), desc=desc, unit="reply", leave=False)
    with autocast, bar:
        for c in range(0, len(jobs), batch):
            chunk = jobs[c:c + batch]
            gens = model.generate([prompts[i] for _, i, _ in chunk], max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed + c,
                                  eos_id=tokenizer.eos_id)
            for (_, i, j), g in zip(chunk, gens):
                eos = bool(g) and g[-1] == tokenizer.eos_id
                text = tokenizer.decode(g[:-1] if eos else g)
                out[i][j] = Reply(clean_reply(text, stop_at_newline), eos, len(g))
            bar.update(len(chunk))
    model.free_cache()
    return out
