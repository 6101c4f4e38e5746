"""Errors of the CPU kernels in bfloat16 against float64, beside the plain-PyTorch reference's
(issue 25), at the demo model's shapes.

Each op runs forward and backward on the same bfloat16 inputs three ways: our kernel in bfloat16
(float32 arithmetic inside), the reference (llama2.ref_*) in bfloat16, and the reference in
float64 (the truth). Printed: the max abs error of ours and of the reference against float64, per
output and gradient, and their ratio; tests/test_kernels.py asserts ratio <= 2 (plus a small slack),
flash-attention's rule.

    OMP_NUM_THREADS=1 python bench/bf16_kernel_errors.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama2  # noqa: E402
import llama2_kernels as K  # noqa: E402

B, T, H, KV, D, C = 8, 256, 6, 2, 32, 192  # the demo preset, a batch of 8 x 256 tokens


def errors(name, ours_fn, ref_fn, inputs, labels, extra64=None):
    """Max abs error vs float64 of (ours, reference) for the output and each input's gradient."""
    g = torch.randn_like(ours_fn(*inputs)).bfloat16()
    runs = {}
    for label, fn, dtype in (("ours", ours_fn, torch.bfloat16), ("ref", ref_fn, torch.bfloat16),
                             ("ref64", extra64 or ref_fn, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        runs[label] = [out, *torch.autograd.grad(out, leaves, g.to(dtype))]
    names = ["out"] + [f"grad {n}" for n in labels]
    for i, what in enumerate(names):
        e = (runs["ours"][i].double() - runs["ref64"][i]).abs().max().item()
        r = (runs["ref"][i].double() - runs["ref64"][i]).abs().max().item()
        print(f"{name:10s} {what:12s} ours {e:.3e}   reference {r:.3e}   ratio {e / r:.2f}")


def main():
    torch.manual_seed(0)
    x, w = torch.randn(B, T, C).bfloat16(), (1 + 0.5 * torch.randn(C)).bfloat16()
    errors("rms_norm", lambda x, w: K.rms_norm(x, w, 1e-5),
           lambda x, w: llama2.ref_rms_norm(x, w, 1e-5), (x, w), ("x", "weight"))
    pos = torch.arange(T)
    cos, sin = llama2.rope_table(D, 2 * T)
    cos64, sin64 = llama2.rope_table(D, 2 * T, dtype=torch.float64)
    xr = torch.randn(B, T, H, D).bfloat16()
    errors("rope", lambda x: K.rope(x, pos, cos, sin),
           lambda x: llama2.ref_rope(x, pos.expand(B, T), cos, sin), (xr,), ("x",),
           extra64=lambda x: llama2.ref_rope(x, pos.expand(B, T), cos64, sin64))
    q = torch.randn(B, T, H, D).bfloat16()
    k, v = torch.randn(B, T, KV, D).bfloat16(), torch.randn(B, T, KV, D).bfloat16()
    errors("attention", lambda q, k, v: K.attention(q, k, v),
           lambda q, k, v: llama2.ref_attention(q, k, v), (q, k, v), "qkv")


if __name__ == "__main__":
    main()
