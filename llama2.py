"""Llama 2 in one file: the model, generation, tokenizer, chat format and checkpoint loading.

This is the architecture of Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat
Models" (arXiv 2307.09288), exactly as Meta's reference code (github meta-llama/llama, model.py and
generation.py) builds it, with Meta's parameter names so their checkpoints load one to one:
pre-norm decoder blocks with RMSNorm, rotary position embeddings (RoPE) on interleaved pairs,
grouped-query attention (GQA), a SwiGLU feed-forward and an untied output projection.

The three hot paths (RMSNorm, RoPE, attention) each go through one function with a plain PyTorch
reference right beside it; when the compiled extension (csrc/, built by `pip install -e .`) is
present, its kernels are used instead. LLAMA2_NO_EXT=1 forces the reference path.

RewardModel (right after Transformer) is the same body with a scalar head, the reward model of
the paper's §3.2.2: `rm.score(dialogs, responses)` reads each reward at the response's EOS.

    python llama2.py --checkpoint out/pretrain --prompt "ROMEO:"          # generate
    python llama2.py --checkpoint llama-2-7b-chat --chat --system "Be brief."
    python llama2.py --checkpoint out/sft --export-hf out/sft-hf            # for transformers, vLLM
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import pickle
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hot paths: RMSNorm, RoPE, attention. Each has a plain-PyTorch reference (the test oracle) and
# dispatches to the compiled extension when it is built and has a kernel for the inputs.

try:
    import llama2_kernels as _ext
except ImportError:  # not built: the reference path runs everywhere
    _ext = None

_KERNELS = "ext" if (_ext is not None and _ext.AVAILABLE and os.environ.get("LLAMA2_NO_EXT") != "1") else "ref"
_REPORTED = False


def set_kernels(name: str) -> None:
    """Choose the hot-path implementation: "ext" (compiled kernels) or "ref" (plain PyTorch)."""
    global _KERNELS
    if name not in ("ext", "ref"):
        raise ValueError(f"set_kernels: unknown path {name!r}; use 'ext' or 'ref'")
    if name == "ext" and (_ext is None or not _ext.AVAILABLE):
        raise RuntimeError("set_kernels('ext'): the llama2_C extension is not built; "
                           "run `pip install --no-build-isolation -e .` first")
    _KERNELS = name


def kernels_in_use() -> str:
    """The active hot-path implementation, "ext" or "ref"."""
    return _KERNELS


def _report_kernels_once() -> None:
    global _REPORTED
    if not _REPORTED:
        _REPORTED = True
        if _KERNELS == "ext":
            where = "CPU + CUDA" if _ext.has_cuda() else "CPU"
            print(f"llama2: using the compiled kernels (llama2_C, {where})", file=sys.stderr)
        else:
            why = "LLAMA2_NO_EXT=1" if os.environ.get("LLAMA2_NO_EXT") == "1" else "extension not built"
            print(f"llama2: using the PyTorch reference kernels ({why})", file=sys.stderr)


def _use_ext(*tensors) -> bool:
    return _KERNELS == "ext" and _ext.supports(*tensors)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least (float64 stays float64, for the float64 test oracle)
    return torch.promote_types(dtype, torch.float32)


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, statistics in float32 (Meta's RMSNorm)."""
    xf = x.to(_compute_dtype(x.dtype))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: the extension's kernel when available, else the reference."""
    if _use_ext(x, weight):
        return _ext.rms_norm(x, weight, eps)
    return ref_rms_norm(x, weight, eps)


def rope_table(head_dim: int, n_positions: int, theta: float = 10000.0, device=None,
               dtype: torch.dtype = torch.float32):
    """cos and sin of position * theta^(-2i/head_dim), each (n_positions, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64, device=device), freqs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def ref_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate Meta's interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by positions (B, T)."""
    B, T, H, D = x.shape
    c = cos[positions].unsqueeze(2)  # (B, T, 1, D/2)
    s = sin[positions].unsqueeze(2)
    xf = x.to(_compute_dtype(x.dtype)).reshape(B, T, H, D // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.reshape(B, T, H, D).type_as(x)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, T, H, D) at explicit per-token positions (B, T) (cache offsets, packed restarts)."""
    if _use_ext(x, cos):
        return _ext.rope(x, positions, cos, sin)
    return ref_rope(x, positions, cos, sin)


def _seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Which packed sequence each of the `total` tokens belongs to, from cumulative lengths."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lens), device=cu_seqlens.device), lens, output_size=total)


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with grouped-query heads, without copying K/V per query head.

    q (B, Tq, H, D), k and v (B, Tk, KV, D), H a multiple of KV; query head h reads K/V head
    h // (H // KV) (Meta's repeat_kv order). Causal is bottom-right aligned: query i sees keys
    j <= i + Tk - Tq (so decoding with a KV cache works). cu_seqlens (S+1,) int32, with B == 1:
    packed sequences, attention stays inside each one. Softmax in float32 (or float64).
    """
    B, Tq, H, D = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    G = H // KV
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # The G query heads of a group stacked as rows, so one matmul per K/V head serves all of them.
    qg = q.reshape(B, Tq, KV, G, D).permute(0, 2, 3, 1, 4).reshape(B, KV, G * Tq, D)
    kt = k.permute(0, 2, 3, 1)  # (B, KV, D, Tk)
    vt = v.permute(0, 2, 1, 3)  # (B, KV, Tk, D)
    scores = (qg @ kt).to(_compute_dtype(q.dtype)) * scale  # (B, KV, G*Tq, Tk)
    scores = scores.view(B, KV, G, Tq, Tk)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed, diagonal=Tk - Tq)
    if cu_seqlens is not None:
        if B != 1 or Tq != Tk:
            raise ValueError("attention: packed sequences (cu_seqlens) need B == 1 and Tq == Tk")
        ids = _seq_ids(cu_seqlens, Tk)
        allowed = allowed & (ids[:, None] == ids[None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(B, KV, G * Tq, Tk)
    out = probs @ vt  # (B, KV, G*Tq, D)
    return out.view(B, KV, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped-query attention (see ref_attention): the extension's flash kernel when available."""
    if _KERNELS == "ext" and _ext.supports_attention(q, k, v):
        return _ext.attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)
    return ref_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)


# -----------------------------------------------------------------------------
# Model configuration

@dataclass
class ModelArgs:
    dim: int = 4096  # model width
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: Optional[int] = None  # key/value heads (GQA); None = n_heads (plain MHA)
    vocab_size: int = 32000  # tokenizer vocabulary
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # scales the FFN hidden size (70B: 1.3)
    ffn_hidden_dim: Optional[int] = None  # explicit FFN hidden size (HF configs); overrides the rule
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 4096  # context length; the RoPE table covers twice this

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelArgs: head_dim={self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size by Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        """A named shape (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """From a dict such as a checkpoint's "model_args"; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelArgs: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


PRESETS = {
    # The released Llama 2 shapes (SPEC.md section 1); vocab 32000, eps 1e-5, theta 10000.
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, multiple_of=256),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    # Small shapes for CPU work: tests, demos, the stage scripts' defaults.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=128),
    "demo": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=4096, multiple_of=64, max_seq_len=256),
    "small": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=4096, multiple_of=32, max_seq_len=512),
}


# -----------------------------------------------------------------------------
# Model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional preallocated KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k: Optional[torch.Tensor] = None  # (max_batch, n_kv, max_len, hd), set by setup_cache
        self.cache_v: Optional[torch.Tensor] = None

    def forward(self, x, positions, cos, sin, cu_seqlens=None, start_pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, positions, cos, sin), apply_rope(k, positions, cos, sin)
        if start_pos is not None:
            # Write this block's keys/values into the cache in place, then attend over everything
            # so far. The cache is head-major (B, n_kv, max_len, hd), so a decode step reads each
            # (row, head)'s keys as one contiguous block; attention takes the (B, Tk, n_kv, hd)
            # view of it as it is (any strides), no copy.
            self.cache_k[:B, :, start_pos:start_pos + T] = k.transpose(1, 2)
            self.cache_v[:B, :, start_pos:start_pos + T] = v.transpose(1, 2)
            k = self.cache_k[:B, :, :start_pos + T].transpose(1, 2)  # (B, Tk, n_kv, hd)
            v = self.cache_v[:B, :, :start_pos + T].transpose(1, 2)
        y = attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)  # (B, T, H, hd)
        return self.wo(y.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, positions, cos, sin, cu_seqlens=None, start_pos=None):
        h = x + self.attention(self.attention_norm(x), positions, cos, sin, cu_seqlens, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._rope_cache: dict = {}
        if self.output.weight.device.type != "meta":
            self.apply(self._init_weights)
            # Residual projections scaled down by depth (GPT-2), so the residual stream starts calm.
            for name, p in self.named_parameters():
                if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))
        _report_kernels_once()

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope(self, device, dtype):
        # The cos/sin table is kept in float32 (float64 for a float64 model), whatever .to() did.
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (str(device), table_dtype)
        if key not in self._rope_cache:
            # Built outside inference mode, so a table first made while generating can serve training.
            with torch.inference_mode(False):
                self._rope_cache[key] = rope_table(self.args.head_dim, 2 * self.args.max_seq_len,
                                                   self.args.rope_theta, device, table_dtype)
        return self._rope_cache[key]

    def hidden(self, tokens, *, positions=None, cu_seqlens=None, start_pos=None):
        """The final normed hidden states (B, T, dim); see forward for the arguments."""
        B, T = tokens.shape
        if cu_seqlens is not None and start_pos is not None:
            raise ValueError("forward: packed sequences (cu_seqlens) and the KV cache (start_pos) do not mix")
        offset = 0 if start_pos is None else start_pos
        if offset + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {offset + T} tokens is longer than the context "
                             f"(max_seq_len={self.args.max_seq_len}); shorten the input")
        # The kernels read positions and cu_seqlens unchecked (a check would be a device-to-host
        # sync per call): they are checked here, once per forward, while on the host, then moved to
        # the device once. Ones the caller already put on a GPU, or a torch.compile'd model's
        # (a data-dependent check would break the graph), are the caller's to validate.
        check = not torch.compiler.is_compiling()
        check_positions = check and positions is not None and positions.device.type == "cpu"
        if check and cu_seqlens is not None and cu_seqlens.device.type == "cpu":
            cu = cu_seqlens.long()
            if (cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != B * T
                    or bool((cu[1:] < cu[:-1]).any())):
                raise ValueError(f"cu_seqlens must be (S+1,), non-decreasing from 0 to B*T = "
                                 f"{B * T}; got {cu.tolist()[:6]}{'...' if len(cu) > 6 else ''}")
            cu_seqlens = cu_seqlens.to(tokens.device, non_blocking=True)
        if positions is None:
            if cu_seqlens is not None:  # packed examples: positions restart at each one
                flat = torch.arange(B * T, device=tokens.device)
                starts = cu_seqlens.long()[_seq_ids(cu_seqlens, B * T)]
                positions = (flat - starts).view(B, T)
            else:
                positions = torch.arange(offset, offset + T, device=tokens.device).expand(B, T)
        h = self.tok_embeddings(tokens)
        cos, sin = self._rope(h.device, h.dtype)
        if check_positions:
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cos.shape[0]):
                raise ValueError(f"positions must lie in [0, {cos.shape[0]}) (the RoPE table, 2 x "
                                 f"max_seq_len); got {int(positions.min())}..{int(positions.max())}")
            positions = positions.to(tokens.device, non_blocking=True)
        if cu_seqlens is not None:
            # Packed rows are one long sequence to attention: (B, T, ...) -> (1, B*T, ...).
            h = h.view(1, B * T, -1)
            positions = positions.reshape(1, B * T)
        for layer in self.layers:
            h = layer(h, positions, cos, sin, cu_seqlens, start_pos)
        return self.norm(h).view(B, T, -1)

    def forward(self, tokens, targets=None, *, positions=None, cu_seqlens=None, start_pos=None):
        """tokens (B, T) -> (logits (B, T, vocab) float32, loss or None).

        targets (B, T): next-token ids, -100 where no loss is taken (prompts, padding); the loss is
        the mean cross-entropy over the kept tokens. positions (B, T): explicit RoPE positions
        (default 0..T-1, or restarting per example when packed). cu_seqlens (S+1,) int32: packed
        examples over the flattened B*T tokens, attention stays within each. start_pos: read and
        write the KV cache (see setup_cache), this block starting at that position. positions and
        cu_seqlens given on the CPU are checked here (a ValueError says what is wrong); given on a
        GPU they are used as they are, so validate them where you make them.
        """
        h = self.hidden(tokens, positions=positions, cu_seqlens=cu_seqlens, start_pos=start_pos)
        logits = self.output(h).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def setup_cache(self, max_batch: int, max_len: int) -> None:
        """Preallocate each layer's KV cache, (max_batch, n_kv, max_len, hd), in the compute dtype.

        The buffers are kept between calls of the same shape (generate writes them in place, no
        per-step torch.cat); free_cache releases them.
        """
        p = self.output.weight
        # Under autocast the keys and values come out of wk/wv in the autocast dtype: cache that.
        on = p.device.type
        dtype = torch.get_autocast_dtype(on) if torch.is_autocast_enabled(on) else p.dtype
        for layer in self.layers:
            a = layer.attention
            shape = (max_batch, a.n_kv_heads, max_len, a.head_dim)
            if a.cache_k is None or a.cache_k.shape != shape or a.cache_k.dtype != dtype or a.cache_k.device != p.device:
                a.cache_k = torch.zeros(shape, dtype=dtype, device=p.device)
                a.cache_v = torch.zeros(shape, dtype=dtype, device=p.device)

    def free_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    @torch.inference_mode()
    def generate(self, prompts: list, max_new_tokens: int, temperature: float = 0.6, top_p: float = 0.9,
                 seed: Optional[int] = None, eos_id: Optional[int] = None,
                 stream: Optional[Callable[[int, int], None]] = None, return_logits: bool = False):
        """Continue each prompt (a list of token ids); returns each row's new tokens.

        Prompts of different lengths share one batch (Meta's scheme: every row advances one
        position per step; a row still inside its prompt keeps its prompt token). Sampling uses
        temperature and top-p (Meta's defaults 0.6 / 0.9); temperature 0 is greedy. A row stops
        at eos_id (kept as its last token) or after max_new_tokens; finished rows leave the batch
        and the loop ends when none is left. stream(row, token) is called for every new token
        (row: the prompt's index). With return_logits, also returns each row's logits for its new
        tokens.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
        device = self.output.weight.device
        B, lens = len(prompts), [len(p) for p in prompts]
        longest = max(lens)
        max_len = self.args.max_seq_len
        if longest >= max_len:
            raise ValueError(f"generate: a prompt of {longest} tokens does not fit the context "
                             f"(max_seq_len={max_len}) with room to generate; shorten it")
        total = min(max_len, longest + max_new_tokens)
        # The padded (B, total) token grid in one host-to-device copy, not one per prompt.
        tokens = torch.tensor([list(p) + [0] * (total - len(p)) for p in prompts], dtype=torch.long,
                              device=device)
        lens_t = torch.tensor(lens, device=device)
        in_prompt = torch.arange(total, device=device)[None, :] < lens_t[:, None]  # (B, total)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.setup_cache(B, total)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        logits_out = [[] for _ in range(B)]
        per_row = return_logits or stream is not None
        rows = list(range(B))  # which prompt each row of the (shrinking) batch is
        alive = torch.arange(B, device=device)  # the same, on the device
        finished = {}  # prompt index -> its token row, kept when the row leaves the batch
        prev = 0
        for cur in range(min(lens), total):
            h = self.hidden(tokens[:, prev:cur], start_pos=prev)
            logits = self.output(h[:, -1]).float()  # (B, vocab)
            # One uniform per prompt every step, also for prompts whose rows left the batch, so a
            # prompt's draws do not depend on when the others finished.
            u = None
            if temperature > 0:
                u = torch.rand(B, 1, generator=gen, device=device, dtype=torch.float64)[alive]
            nxt = sample(logits, temperature, top_p, gen, u=u)
            if cur < longest:
                # Rows still inside their prompt keep the prompt's token.
                generating = ~in_prompt[:, cur] & ~done
                nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            else:
                generating = ~done
            tokens[:, cur] = nxt
            # The per-row host loop only when someone reads per-row results (a sync per step).
            if per_row:
                for i in generating.nonzero().flatten().tolist():
                    if return_logits:
                        logits_out[rows[i]].append(logits[i])
                    if stream is not None:
                        stream(rows[i], int(nxt[i]))
            if eos_id is not None:
                done |= generating & (nxt == eos_id)
            done |= generating & (cur + 1 - lens_t >= max_new_tokens)
            prev = cur
            # Stop early once every row has hit EOS or its max_new_tokens.
            n_done = int(done.sum())
            if n_done == len(rows):
                break
            # Replies end at different lengths: once every row is past its prompt and a quarter of
            # the batch is done, drop the finished rows (tokens and KV cache), so later steps
            # compute only the live ones. The quarter bounds the copying to a fraction of a step.
            if cur >= longest and 4 * n_done >= len(rows):
                for i in done.nonzero().flatten().tolist():
                    finished[rows[i]] = tokens[i, :cur + 1].tolist()
                keep = (~done).nonzero().flatten()
                rows = [rows[i] for i in keep.tolist()]
                alive = alive[keep]
                tokens, lens_t, done = tokens[keep], lens_t[keep], done[keep]
                for layer in self.layers:  # the cache holds positions [0, cur) so far
                    a = layer.attention
                    a.cache_k[:len(rows), :, :cur] = a.cache_k[keep, :, :cur]
                    a.cache_v[:len(rows), :, :cur] = a.cache_v[keep, :, :cur]
        for i, row in enumerate(tokens[:, :prev + 1].tolist()):  # one device-to-host copy
            finished[rows[i]] = row
        out = []
        for i, p in enumerate(prompts):
            row = finished[i][lens[i]:][:max_new_tokens]
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            out.append(row)
        if return_logits:
            return out, [torch.stack(l[:len(o)]) if l else torch.empty(0) for l, o in zip(logits_out, out)]
        return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None,
           u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): greedy at temperature 0, else top-p sampling.

    Top-p keeps the smallest set of most likely tokens whose mass reaches top_p (Meta's
    sample_top_p); top_p >= 1 keeps them all. The draw is one uniform number per row through
    the kept tokens' cumulative distribution (inverse CDF), so the random stream is the same
    whichever of the paths below finds the kept set. u (B, 1) float64 in [0, 1): those numbers,
    if the caller drew them (default: drawn here from generator).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    if top_p >= 1:
        # Every token is kept: no sort, draw straight from the softmax.
        return _draw(probs, u)
    # A full sort of the vocabulary is the slow part; the nucleus usually lies in the first few
    # dozen tokens, which topk finds. Rows whose nucleus is wider (flat distributions, high
    # temperature) look again in the top 512, and only the rows still not covered are sorted in
    # full: sorting the whole batch for one flat row had cost 40% of sampling at T >= 1.
    V = probs.shape[-1]
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    k = min(V, 64)
    while rows.numel():
        p = probs if rows.numel() == probs.shape[0] else probs[rows]
        if k < V:
            sorted_p, idx = p.topk(k, dim=-1)  # descending
        else:
            sorted_p, idx = p.sort(dim=-1, descending=True)
        mass = sorted_p.cumsum(dim=-1)
        # covered: token k+1 would be dropped (the mass before it already exceeds top_p)
        covered = (mass[:, -1] > top_p) | (k >= V)
        done = covered.nonzero().squeeze(1)
        if done.numel():
            # keep the smallest set of tokens whose mass reaches top_p (the first token always stays)
            kept = sorted_p[done].masked_fill(mass[done] - sorted_p[done] > top_p, 0.0)
            out[rows[done]] = idx[done].gather(-1, _draw(kept, u[rows[done]])[:, None]).squeeze(-1)
        rows = rows[~covered]
        k = min(V, k * 8)
    return out


def _draw(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of p (B, n) >= 0 (unnormalized), the index whose cumulative-mass interval holds u (B, 1)
    in [0, 1) times the row's mass: index i with probability p_i / sum(p)."""
    cdf = p.to(torch.float64).cumsum(dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the first entry of cdf above it always exists and has p_i > 0.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def count_params(args: ModelArgs) -> int:
    """Parameter count of a shape, computed on the meta device (no memory for weights)."""
    with torch.device("meta"):
        return Transformer(args).num_params()


# -----------------------------------------------------------------------------
# Reward model (paper §3.2.2): the chat model with a scalar head, read at each response's EOS

class RewardModel(Transformer):
    """The chat model with its next-token head replaced by a scalar regression head.

    The body (tok_embeddings, layers, norm) is the Transformer's, with Meta's names, so the reward
    model is initialized from an SFT or GAtt checkpoint one to one (`RewardModel.from_chat`);
    `output` (vocab x dim) is gone and `reward_head` (1 x dim, no bias, initialized
    N(0, std 1/sqrt(dim+1))) takes its place. A sequence's reward is the head applied to the final
    hidden state of the last token of the response, its EOS, at a position found explicitly from
    each sequence's length (`encode_response` checks the token is EOS), never as "first pad - 1".
    """

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        del self.output  # the next-token head is replaced by one scalar per sequence
        self.reward_head = nn.Linear(args.dim, 1, bias=False)
        if self.reward_head.weight.device.type != "meta":
            nn.init.normal_(self.reward_head.weight, mean=0.0, std=1.0 / math.sqrt(args.dim + 1))
        self.tokenizer: Optional["Tokenizer"] = None  # what score() encodes with, if not given

    @classmethod
    def from_chat(cls, model: Transformer, seed: Optional[int] = None) -> "RewardModel":
        """A reward model initialized from a chat model: its body's weights (copied), a fresh head."""
        with torch.device("meta"):
            rm = cls(model.args)
        p = model.tok_embeddings.weight
        sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "output.weight"}
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        sd["reward_head.weight"] = (torch.randn(1, model.args.dim, generator=gen)
                                    / math.sqrt(model.args.dim + 1)).to(p.device, p.dtype)
        rm.load_state_dict(sd, assign=True)
        return rm

    def forward(self, tokens, ends=None, *, positions=None, cu_seqlens=None):
        """tokens (B, T) -> rewards, float32.

        ends (S,) int64: flat indices into the B*T tokens of the tokens to read (each sequence's
        EOS; see pack_sequences) -> (S,). ends None -> (B, T), a scalar at every token (what a
        value model reads). positions and cu_seqlens as in Transformer.forward.
        """
        h = self.hidden(tokens, positions=positions, cu_seqlens=cu_seqlens)  # (B, T, dim)
        if ends is None:
            return self.reward_head(h).squeeze(-1).float()  # (B, T)
        return self.reward_head(h.reshape(-1, h.size(-1))[ends]).squeeze(-1).float()  # (S,)

    def generate(self, *args, **kwargs):
        raise TypeError("a RewardModel scores sequences (score, forward); it does not generate")

    @torch.inference_mode()
    def score(self, dialogs: list, responses: list, tokenizer: Optional["Tokenizer"] = None,
              batch_tokens: Optional[int] = None) -> torch.Tensor:
        """Rewards (N,) float32 of responses[i] as the assistant's answer to dialogs[i].

        Each dialog ends with a user message; the dialog plus response is encoded in Meta's chat
        format ending with the response's EOS (encode_response), the sequences are packed with
        cu_seqlens (no attention across them), at most batch_tokens (default 8 rows of the context)
        per forward pass, and each reward is read at its EOS.
        """
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("RewardModel.score: give a tokenizer (or set model.tokenizer)")
        if len(dialogs) != len(responses):
            raise ValueError(f"RewardModel.score: {len(dialogs)} dialogs but {len(responses)} responses")
        seqs = [encode_response(tok, d, r) for d, r in zip(dialogs, responses)]
        budget = batch_tokens or 8 * self.args.max_seq_len
        device = self.tok_embeddings.weight.device
        out = torch.empty(len(seqs), dtype=torch.float32)
        too_long = [i for i, s in enumerate(seqs) if len(s) > self.args.max_seq_len]
        if too_long:
            raise ValueError(f"RewardModel.score: dialog {too_long[0]} with its response has "
                             f"{len(seqs[too_long[0]])} tokens, more than the context "
                             f"({self.args.max_seq_len})")
        # similar lengths together, at most `budget` tokens per forward pass
        chunks, cur, used = [], [], 0
        for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i])):
            if cur and used + len(seqs[i]) > budget:
                chunks.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += len(seqs[i])
        chunks += [cur] if cur else []
        for chunk in chunks:
            b = pack_sequences([seqs[i] for i in chunk], self.args.max_seq_len, device=device)
            out[chunk] = self(b["tokens"], b["ends"], cu_seqlens=b["cu_seqlens"]).cpu()
        return out


def pack_sequences(seqs: list, seq_len: int, pad_id: int = 0, device="cpu") -> dict:
    """Pack token sequences into rows of at most seq_len tokens, greedily in the given order.

    Returns tokens (B, T) int64 (T the longest row, the rest pad_id), cu_seqlens (int32, over the
    flattened B*T tokens: every sequence and every row's padding a segment of its own, so attention
    stays within a sequence and positions restart at 0 for each) and ends (S,) int64: the flat
    index of each sequence's last token, in the order given.
    """
    rows, cur, used = [], [], 0
    for i, s in enumerate(seqs):
        if not 0 < len(s) <= seq_len:
            raise ValueError(f"pack_sequences: sequence {i} has {len(s)} tokens; each needs 1..{seq_len}")
        if cur and used + len(s) > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += len(s)
    rows.append(cur)
    T = max(sum(len(seqs[i]) for i in row) for row in rows)
    tokens, cu, ends = [], [0], [0] * len(seqs)
    for r, row in enumerate(rows):
        flat = []
        for i in row:
            flat += seqs[i]
            ends[i] = r * T + len(flat) - 1
            cu.append(cu[-1] + len(seqs[i]))
        if len(flat) < T:
            cu.append(cu[-1] + T - len(flat))  # the row's padding: a segment of its own
        tokens.append(flat + [pad_id] * (T - len(flat)))
    return {"tokens": torch.tensor(tokens, dtype=torch.long, device=device),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=device),
            "ends": torch.tensor(ends, dtype=torch.long, device=device)}


def encode_response(tokenizer: "Tokenizer", dialog: list, response: str) -> list:
    """Token ids of a dialog (ending with a user message) answered by `response`, in Meta's chat
    format: the last token is the EOS that closes the answer, where a reward model reads."""
    ids, _ = encode_dialog(tokenizer, list(dialog) + [{"role": "assistant", "content": response}],
                           for_training=True)
    if ids[-1] != tokenizer.eos_id:  # cannot happen with encode_dialog; the RM relies on it
        raise ValueError("encode_response: the sequence does not end with the EOS token")
    return ids


# -----------------------------------------------------------------------------
# Tokenizer and chat format

class Tokenizer:
    """A SentencePiece model (Meta's tokenizer.model or one trained by train_tokenizer)."""

    def __init__(self, model_path: Optional[str] = None, model_bytes: Optional[bytes] = None):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        if model_bytes is not None:
            self.sp.LoadFromSerializedProto(bytes(model_bytes))
        elif model_path is not None:
            if not os.path.isfile(model_path):
                raise FileNotFoundError(f"tokenizer model not found: {model_path}")
            self.sp.Load(model_path)
        else:
            raise ValueError("Tokenizer: give model_path or model_bytes")
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    @classmethod
    def from_bytes(cls, b) -> "Tokenizer":
        if isinstance(b, torch.Tensor):
            b = b.cpu().numpy().tobytes()
        return cls(model_bytes=b)

    @property
    def model_bytes(self) -> bytes:
        return self.sp.serialized_model_proto()

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.sp.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


def train_tokenizer(files: list, model_prefix: str, vocab_size: int, **overrides) -> str:
    """Train a SentencePiece BPE tokenizer with Llama 2's trainer settings; returns the .model path.

    Settings from Meta's tokenizer.model (SPEC.md section 2): BPE, digits split, byte fallback for
    unknown UTF-8, unk=0 bos=1 eos=2 and no pad, identity normalization, dummy prefix, whitespace kept.
    """
    import sentencepiece as spm
    if vocab_size < 300:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is too small; byte fallback alone "
                         "needs 256 pieces plus the specials, use at least 300")
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise FileNotFoundError(f"train_tokenizer: no such input files: {missing or files}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    settings = dict(
        input=",".join(files), model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
        character_coverage=0.99995, max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    settings.update(overrides)
    try:
        spm.SentencePieceTrainer.train(**settings)
    except RuntimeError as e:
        if "Vocabulary size" in str(e):
            raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is too large for this corpus "
                             f"({e}); choose a smaller vocab or give more text") from None
        raise
    return model_prefix + ".model"


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
RESERVED_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def encode_dialog(tokenizer: Tokenizer, messages: list, for_training: bool = False):
    """A dialog -> (token ids, answer mask), exactly as Meta's chat_completion builds the ids.

    messages: optional {"role": "system"} first, then user/assistant alternating. For generation
    it ends with a user turn (the ids end with "[/INST]"); for training it ends with an assistant
    turn. Each finished pair is BOS "[INST] {user} [/INST] {answer} " EOS; the system message goes
    in a <<SYS>> block at the start of the first user message. answer_mask[i] is 1 for the tokens
    of assistant answers and their EOS (what SFT trains on), else 0.
    """
    if not messages:
        raise ValueError("encode_dialog: the dialog is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"encode_dialog: message {i} must be a dict with 'role' and 'content'")
        if any(tag in m["content"] for tag in RESERVED_TAGS):
            raise ValueError(f"encode_dialog: message {i} contains a reserved tag "
                             f"({', '.join(RESERVED_TAGS)}); remove it from the content")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("encode_dialog: a system message must be followed by a user message")
        first = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
        messages = [first] + list(messages[2:])
    roles = [m["role"] for m in messages]
    for i, r in enumerate(roles):
        want = "user" if i % 2 == 0 else "assistant"
        if r != want:
            raise ValueError(f"encode_dialog: message {i} has role {r!r} where {want!r} was expected; "
                             "roles go: optional system, then user/assistant alternating")
    last = "assistant" if for_training else "user"
    if roles[-1] != last:
        purpose = "training must end with an assistant" if for_training else "generation must end with a user"
        raise ValueError(f"encode_dialog: a dialog for {purpose} message, not {roles[-1]!r}")
    ids, mask = [], []
    for user, answer in zip(messages[0::2], messages[1::2]):
        prompt = f"{B_INST} {user['content'].strip()} {E_INST}"
        pair = tokenizer.encode(f"{prompt} {answer['content'].strip()} ", bos=True, eos=True)
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        n_prompt = len(prompt_ids)
        if pair[:n_prompt] != prompt_ids:  # cannot happen with whitespace-split SentencePiece models
            raise ValueError("encode_dialog: the tokenizer merges across the [/INST] boundary; "
                             "the answer mask would be wrong")
        ids += pair
        mask += [0] * n_prompt + [1] * (len(pair) - n_prompt)
    if not for_training:
        tail = tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        ids += tail
        mask += [0] * len(tail)
    return ids, mask


# -----------------------------------------------------------------------------
# Checkpoints: ours (ckpt.pt), Meta's (params.json + consolidated.NN.pth), Hugging Face's

def check_state_dict(model: nn.Module, sd: dict, source: str = "checkpoint") -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped tensors."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    misshaped = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have))
                 if want[k] != have[k]]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:12]) + (" ..." if len(items) > 12 else ""))
        raise ValueError("\n".join(lines))


def build_from_state_dict(args: ModelArgs, sd: dict, device="cpu", dtype=None, source="checkpoint"):
    """Build a Transformer on the meta device and assign the tensors (no second copy in memory)."""
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(model, sd, source)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.to(device)


def load_checkpoint_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """One checkpoint file's contents: *.safetensors through safetensors, anything else through
    torch.load(weights_only=True, mmap=True) (no code runs; tensors are paged in on use). Every
    checkpoint file the project reads comes through here, so a truncated or corrupted one ends
    with one line, `error: <path> is not a readable checkpoint (truncated or corrupted?)`."""
    from safetensors import SafetensorError
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device=str(map_location))
        return torch.load(path, map_location=map_location, mmap=True, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # their own message says what is wrong
    # a zip with no central directory (truncated), bad names, a bad pickle, an empty file (mmap)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, SafetensorError):
        raise SystemExit(f"error: {path} is not a readable checkpoint (truncated or corrupted?)") from None


def _meta_merge(shards: list, key: str) -> torch.Tensor:
    """Merge one tensor of Meta's model-parallel shards by their split rules."""
    if len(shards) == 1 or key.endswith("norm.weight"):  # norms are replicated
        return shards[0][key]
    if key == "tok_embeddings.weight" or key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return torch.cat([s[key] for s in shards], dim=1)  # row-parallel and embeddings: split on dim 1
    return torch.cat([s[key] for s in shards], dim=0)  # column-parallel: wq wk wv w1 w3 output


def load_meta(path: str, device="cpu", dtype=None):
    """Meta's layout: params.json + consolidated.NN.pth (any number of model-parallel shards)."""
    params = json.load(open(os.path.join(path, "params.json")))
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"{path}: params.json but no consolidated.NN.pth files")
    shards = [load_checkpoint_file(f) for f in files]
    sd = {k: _meta_merge(shards, k) for k in shards[0] if k != "rope.freqs"}
    if params.get("vocab_size", -1) <= 0:  # Meta's params.json says -1: the tokenizer decides
        params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
    args = ModelArgs.from_dict({k: v for k, v in params.items() if k in {f.name for f in fields(ModelArgs)}})
    model = build_from_state_dict(args, sd, device, dtype, source=f"Meta checkpoint {path}")
    return model, _find_tokenizer(path, os.path.dirname(os.path.abspath(path)))


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved-pair rows of wq/wk -> Hugging Face's half-split (rotate_half) rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's half-split rows of wq/wk -> Meta's interleaved pairs (inverse of _hf_permute)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


_HF_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def _hf_tensors(path: str) -> dict:
    """All tensors of a Hugging Face directory: safetensors (single or sharded) or pytorch_model*.bin."""
    files = (sorted(glob.glob(os.path.join(path, "*.safetensors")))
             or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))))
    if not files:
        raise FileNotFoundError(f"{path}: config.json but no *.safetensors or pytorch_model*.bin")
    out = {}
    for f in files:
        out.update(load_checkpoint_file(f))
    return out


def load_hf(path: str, device="cpu", dtype=None):
    """Hugging Face's LlamaForCausalLM layout, undoing its q/k permutation."""
    args, sd, cfg = _read_hf(path)
    if "output.weight" not in sd and cfg.get("tie_word_embeddings"):
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model = build_from_state_dict(args, sd, device, dtype, source=f"Hugging Face checkpoint {path}")
    return model, _find_tokenizer(path)


def _read_hf(path: str):
    """(ModelArgs, state dict with our names, config.json) of a Hugging Face Llama directory."""
    cfg = json.load(open(os.path.join(path, "config.json")))
    # RoPE settings: "rope_theta" (transformers 4) or "rope_parameters" (transformers 5)
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"{path}: RoPE scaling {scaling} is not Llama 2's RoPE; not supported")
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                     vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
                     rope_theta=rope_theta,
                     max_seq_len=cfg.get("max_position_embeddings", 4096))
    if args.hidden_dim != cfg["intermediate_size"]:
        args.ffn_hidden_dim = cfg["intermediate_size"]
    sd = {}
    for name, t in _hf_tensors(path).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        key = name.removeprefix("model.")
        if key == "embed_tokens.weight":
            key = "tok_embeddings.weight"
        elif key == "lm_head.weight":
            key = "output.weight"
        elif key.startswith("layers."):
            for hf, ours in _HF_NAMES.items():
                key = key.replace(f".{hf}.", f".{ours}.")
        if key.endswith("attention.wq.weight"):
            t = _hf_unpermute(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = _hf_unpermute(t, args.n_kv_heads)
        elif key == "score.weight":  # LlamaForSequenceClassification's head
            key = "reward_head.weight"
        sd[key] = t
    return args, sd, cfg


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str | None = "wb"):
    """Write a file whole or not at all; every file the project writes goes through here
    (training.py and the stage scripts use this one).

        with atomic_write(out / "ckpt.pt") as f: torch.save(state, f)           # binary file
        with atomic_write(out / "config.json", "w") as f: f.write(text)         # text, UTF-8
        with atomic_write(out / "model.safetensors", None) as tmp: save_file(tensors, tmp)

    The block writes to a temp file in the same folder (`.<name>.<pid>.<random>.tmp`); when it
    ends normally the file is flushed, fsync'ed and os.replace'd onto `path`, so a reader sees the
    old file or the new one, never half of one. On any exception (or Ctrl-C) the temp file is
    removed and `path` is left as it was. mode None yields the temp path, for writers that open
    the file themselves. The folder is created if needed.
    """
    if mode not in ("w", "wb", None):
        raise ValueError(f"atomic_write: mode must be 'w', 'wb' or None, not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        if mode is None:
            tmp.touch(exist_ok=False)
            yield str(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            # "x" creates the file (never truncates another's); the umask sets its permissions
            encoding = "utf-8" if mode == "w" else None
            with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_hf(model: Transformer, out_dir: str, tokenizer: Optional[Tokenizer] = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer.model) in Hugging Face's Llama layout
    (LlamaForCausalLM; a RewardModel as LlamaForSequenceClassification with one label)."""
    from safetensors.torch import save_file
    a = model.args
    os.makedirs(out_dir, exist_ok=True)
    inv = {ours: hf for hf, ours in _HF_NAMES.items()}
    tensors = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if key.endswith("attention.wq.weight"):
            t = _hf_permute(t, a.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = _hf_permute(t, a.n_kv_heads)
        if key == "tok_embeddings.weight":
            name = "model.embed_tokens.weight"
        elif key == "output.weight":
            name = "lm_head.weight"
        elif key == "reward_head.weight":
            name = "score.weight"  # LlamaForSequenceClassification's scalar head
        elif key == "norm.weight":
            name = "model.norm.weight"
        else:
            layer, rest = key.split(".", 2)[1], key.split(".", 2)[2]  # layers.N.<module>.<...>
            module, leaf = rest.rsplit(".", 1)
            name = f"model.layers.{layer}.{inv[module]}.{leaf}"
        tensors[name] = t.contiguous()
    dtype = next(iter(tensors.values())).dtype
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": a.dim, "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
        "rms_norm_eps": a.norm_eps, "max_position_embeddings": a.max_seq_len,
        "rope_theta": a.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "pretraining_tp": 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if isinstance(model, RewardModel):
        # one label; transformers reads it at the last token that is not pad_token_id (our EOS)
        cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=0)
    with atomic_write(os.path.join(out_dir, "model.safetensors"), None) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_write(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        with atomic_write(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(tokenizer.model_bytes)


def _find_tokenizer(*dirs) -> Optional[Tokenizer]:
    for d in dirs:
        p = os.path.join(d, "tokenizer.model")
        if os.path.isfile(p):
            return Tokenizer(p)
    return None


def load_ours(path: str, device="cpu", dtype=None, ckpt: Optional[dict] = None):
    """Our training checkpoint: ckpt.pt with "model_args", "model" and "tokenizer" (`ckpt`: its
    contents when the caller has read them already)."""
    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
    for key in ("model_args", "model"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a llama2 checkpoint (no {key!r}); keys: {sorted(ckpt)}")
    args = ModelArgs.from_dict(ckpt["model_args"])
    model = build_from_state_dict(args, ckpt["model"], device, dtype, source=f"checkpoint {path}")
    tok = Tokenizer.from_bytes(ckpt["tokenizer"]) if ckpt.get("tokenizer") is not None else None
    return model, tok


def load_reward_model(path: str, device="cpu", dtype=None, ckpt: Optional[dict] = None):
    """Load a reward model -> (RewardModel in eval mode with .tokenizer set, tokenizer or None).

    path: our checkpoint written by train_rm.py (ckpt.pt with "reward_head.weight") or a Hugging
    Face LlamaForSequenceClassification directory with one label (export_hf writes one). A chat
    checkpoint is not a reward model: start one from it with RewardModel.from_chat. `ckpt`: the
    ckpt.pt's contents when the caller has read them already.
    """
    ckpt_file = path if os.path.isfile(path) else os.path.join(path, "ckpt.pt")
    if os.path.isfile(ckpt_file):
        ckpt = load_checkpoint_file(ckpt_file) if ckpt is None else ckpt
        if "reward_head.weight" not in ckpt.get("model", {}):
            raise ValueError(f"{ckpt_file} is a {ckpt.get('stage', 'chat')!r} checkpoint, not a reward "
                             "model; train one with train_rm.py")
        args, sd = ModelArgs.from_dict(ckpt["model_args"]), ckpt["model"]
        tok = Tokenizer.from_bytes(ckpt["tokenizer"]) if ckpt.get("tokenizer") is not None else None
    elif os.path.isfile(os.path.join(path, "config.json")):
        args, sd, cfg = _read_hf(path)
        n_labels = len(cfg["id2label"]) if "id2label" in cfg else cfg.get("num_labels", 1)
        if "reward_head.weight" not in sd or n_labels != 1:
            raise ValueError(f"{path}: not a LlamaForSequenceClassification checkpoint with one label "
                             f"(architectures {cfg.get('architectures')})")
        tok = _find_tokenizer(path)
    else:
        raise FileNotFoundError(f"{path}: no reward model found (looked for ckpt.pt and config.json)")
    with torch.device("meta"):
        model = RewardModel(args)
    check_state_dict(model, sd, f"reward model {path}")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    model = model.to(device).eval()
    model.tokenizer = tok
    return model, tok


def load_model(path: str, device="cpu", dtype=None, ckpt: Optional[dict] = None):
    """Load any supported checkpoint -> (model in eval mode, tokenizer or None).

    path: our checkpoint (a directory with ckpt.pt, or the file), a Meta directory (params.json +
    consolidated.NN.pth) or a Hugging Face directory (config.json + safetensors or .bin). Tensors
    are loaded with weights_only / safetensors and assigned into a model built on the meta device.
    `ckpt`: our ckpt.pt's contents when the caller has read them already.
    """
    if os.path.isfile(path):
        model, tok = load_ours(path, device, dtype, ckpt)
    elif os.path.isfile(os.path.join(path, "ckpt.pt")):
        model, tok = load_ours(os.path.join(path, "ckpt.pt"), device, dtype, ckpt)
    elif os.path.isfile(os.path.join(path, "params.json")):
        model, tok = load_meta(path, device, dtype)
    elif os.path.isfile(os.path.join(path, "config.json")):
        model, tok = load_hf(path, device, dtype)
    else:
        raise FileNotFoundError(f"{path}: no checkpoint found (looked for ckpt.pt, params.json "
                                "(Meta) and config.json (Hugging Face))")
    return model.eval(), tok


# -----------------------------------------------------------------------------
# Command line: generate, chat, export

def _pick_device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _stream_printer(tokenizer: Tokenizer):
    """Print a single row's text as tokens arrive (decode the whole row, print what is new)."""
    state = {"ids": [], "text": ""}

    def on_token(row: int, tok: int):
        if tok == tokenizer.eos_id:
            return
        state["ids"].append(tok)
        text = tokenizer.decode(state["ids"])
        print(text[len(state["text"]):], end="", flush=True)
        state["text"] = text
    return on_token


def _read_ours(path: str) -> Optional[dict]:
    """Our ckpt.pt's contents when `path` is one of ours (the file or its folder), else None; read
    once at startup and handed to the loader."""
    ckpt = path if os.path.isfile(path) else os.path.join(path, "ckpt.pt")
    return load_checkpoint_file(ckpt) if os.path.isfile(ckpt) else None


def _is_reward_model(path: str, ours: Optional[dict]) -> bool:
    """Whether a checkpoint holds a reward model (ours with reward_head, or HF sequence classification)."""
    if ours is not None:
        return "reward_head.weight" in ours.get("model", {})
    cfg = os.path.join(path, "config.json")
    return os.path.isfile(cfg) and "LlamaForSequenceClassification" in json.load(open(cfg)).get(
        "architectures", [])


def _fit_dialog(tok: Tokenizer, dialog: list, max_seq_len: int, room: int):
    """The chat history that fits the context: drop the oldest user/assistant exchanges (the
    system message stays) until the prompt leaves `room` tokens for the reply. Returns (ids, the
    kept dialog, exchanges dropped); the newest user message is always kept."""
    head = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
    turns, dropped = dialog[len(head):], 0
    while True:
        ids, _ = encode_dialog(tok, head + turns)
        if len(ids) + room <= max_seq_len or len(turns) == 1:
            return ids, head + turns, dropped
        turns, dropped = turns[2:], dropped + 1


def _chat(model, tok, system: Optional[str], gen: dict) -> None:
    """The --chat loop: one line per message from the terminal or a pipe, Meta's chat format. When
    the history outgrows the context, the oldest exchanges go (with a notice); /reset clears it."""
    dialog = [{"role": "system", "content": system}] if system else []
    ctx, piped = model.args.max_seq_len, not sys.stdin.isatty()
    # what a reply may use at least; the history gives way to it (half the context at most)
    room = min(gen["max_new_tokens"], ctx // 2)
    print("chat: type a message; /reset clears the history; an empty line or Ctrl-D quits",
          file=sys.stderr)
    while True:
        try:
            user = input("\nuser> ").strip()
        except EOFError:
            break
        if piped:  # a pipe's text is not echoed: print it, so the transcript reads as a dialog
            print(user)
        if not user:
            break
        if user == "/reset":
            dialog = dialog[:1] if system else []
            print("(history cleared" + (", the system message kept)" if system else ")"),
                  file=sys.stderr)
            continue
        try:  # the history changes only once the reply came
            ids, kept, dropped = _fit_dialog(tok, dialog + [{"role": "user", "content": user}],
                                             ctx, room)
            if dropped:
                print(f"(the history outgrew the model's {ctx}-token context: the oldest "
                      f"{dropped} exchange{'s' if dropped > 1 else ''} dropped"
                      f"{', the system message kept' if system else ''}; /reset clears it all)",
                      file=sys.stderr)
            print("assistant> ", end="", flush=True)
            out = model.generate([ids], stream=_stream_printer(tok), **gen)[0]
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        if not out or out[-1] != tok.eos_id:  # cut short: say so, and why
            why = (f"the {ctx}-token context is full" if len(ids) + len(out) >= ctx else
                   f"--max-new-tokens {gen['max_new_tokens']} reached")
            print(f"(reply cut: {why})", file=sys.stderr)
        dialog = kept + [{"role": "assistant", "content": tok.decode([t for t in out if t != tok.eos_id])}]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate with, chat with or export a Llama 2 checkpoint.")

    def flag(name: str, **kw):
        # both spellings: --max-new-tokens here, --max_new_tokens as in the training scripts
        names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        p.add_argument(*names, **kw)
    flag("--checkpoint", required=True, help="our ckpt dir/file, a Meta dir or a Hugging Face dir")
    flag("--tokenizer", default=None, help="tokenizer.model, if the checkpoint has none")
    flag("--prompt", default=None, help="text to continue")
    flag("--chat", action="store_true", help="interactive multi-turn chat in Meta's format")
    flag("--system", default=None, help="system message for --chat")
    flag("--export-hf", default=None, metavar="DIR", help="write the model in Hugging Face layout")
    flag("--max-new-tokens", type=int, default=256, metavar="N", help="longest reply, in tokens (default: %(default)s)")
    flag("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default: %(default)s)")
    flag("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling: keep the top tokens "
         "holding this much probability (default: %(default)s)")
    flag("--seed", type=int, default=None, help="sampling seed (default: unset, each run samples anew)")
    flag("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N (default: %(default)s)")
    flag("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
         help="the weights' dtype (default: as stored in the checkpoint)")
    return p


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    # every check that needs no checkpoint comes before loading one (seconds for a big model)
    if not (a.prompt is not None or a.chat or a.export_hf):
        p.error("give --prompt, --chat or --export-hf")

    device = _pick_device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    ours = _read_ours(a.checkpoint)  # read once (None for a Meta or Hugging Face folder)
    if _is_reward_model(a.checkpoint, ours):
        if not a.export_hf:
            p.error(f"{a.checkpoint} is a reward model: it scores, it does not generate; use "
                    "--export-hf, or train_rm.py --eval")
        model, tok = load_reward_model(a.checkpoint, device=device, dtype=dtype, ckpt=ours)
    else:
        model, tok = load_model(a.checkpoint, device=device, dtype=dtype, ckpt=ours)
    if a.tokenizer:
        tok = Tokenizer(a.tokenizer)
    if a.export_hf:
        export_hf(model, a.export_hf, tok)
        print(f"wrote {a.export_hf} (config.json, model.safetensors{', tokenizer.model' if tok else ''})")
        return
    if tok is None:
        p.error("this checkpoint carries no tokenizer; pass --tokenizer path/to/tokenizer.model")
    gen = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
               eos_id=tok.eos_id)
    if a.chat:
        _chat(model, tok, a.system, gen)
        return
    print(a.prompt, end="", flush=True)
    model.generate([tok.encode(a.prompt, bos=True)], stream=_stream_printer(tok), **gen)
    print()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: say what was wrong, no traceback
        sys.exit(f"error: {e}")
