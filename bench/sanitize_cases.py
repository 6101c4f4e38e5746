"""Six tiny calls of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh).

Each case runs forward and backward through llama2_kernels and checks the result against the
float64 reference (loosely: the point is that the sanitizer watches every kernel once, on the
paths that differ: 16-byte and scalar loads, GQA, causal offset, packed sequences with empty
segments, decode, rows with no key). Small grids keep racecheck and initcheck fast.

    python bench/sanitize_cases.py --device cuda
    compute-sanitizer --tool racecheck python bench/sanitize_cases.py --device cuda
    python bench/sanitize_cases.py --device cpu     # the same cases on the CPU kernels
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llama2  # noqa: E402
import llama2_kernels as K  # noqa: E402


def check(name, got, ref, tol):
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0
    assert torch.isfinite(got).all(), f"{name}: NaN/inf"
    assert err <= tol * scale, f"{name}: error {err:.3g} > {tol * scale:.3g}"


def grads(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


def compare(name, fn, ref, inputs, tol):
    g = torch.randn_like(fn(*inputs))
    ours = grads(fn, inputs, g)
    theirs = grads(ref, [t.double() for t in inputs], g.double())
    for i, (a, b) in enumerate(zip(ours, theirs)):
        check(f"{name}[{i}]", a, b, tol)


def cases(device, low):
    """(name, thunk) for the six cases; low is the 16-bit dtype (bfloat16, or float32 on CPU)."""
    f32 = torch.float32
    tol = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-9}
    r = lambda *s, dt=low: torch.randn(*s, device=device).to(dt)

    def rms(dt, shape):
        x, w = r(*shape, dt=dt), (1 + 0.5 * r(shape[-1], dt=f32)).to(dt)
        compare(f"rms_norm {dt} {shape}", lambda a, b: K.rms_norm(a, b, 1e-5),
                lambda a, b: llama2.ref_rms_norm(a, b, 1e-5), [x, w], tol[dt])

    def rope(dt, B, T, H, D):
        x = r(B, T, H, D, dt=dt)
        pos = torch.randint(0, 2 * T, (B, T), device=device)
        cos, sin = llama2.rope_table(D, 2 * T, device=device)
        compare(f"rope {dt} D={D}", lambda a: K.rope(a, pos, cos, sin),
                lambda a: llama2.ref_rope(a, pos, cos.double(), sin.double()), [x], tol[dt])

    def attn(dt, B, Tq, Tk, H, KV, D, causal, cu=None):
        q, k, v = r(B, Tq, H, D, dt=dt), r(B, Tk, KV, D, dt=dt), r(B, Tk, KV, D, dt=dt)
        if cu is not None:
            cu = torch.tensor(cu, dtype=torch.int32, device=device)
        compare(f"attention {dt} B{B} Tq{Tq} Tk{Tk} H{H} KV{KV} D{D}",
                lambda a, b, c: K.attention(a, b, c, causal=causal, cu_seqlens=cu),
                lambda a, b, c: llama2.ref_attention(a, b, c, causal=causal, cu_seqlens=cu),
                [q, k, v], tol[dt])

    attn_low = low if device.type == "cuda" else f32  # the CPU attention kernel takes float32/64
    half = torch.float16 if device.type == "cuda" else f32
    return [
        ("rms_norm: 16-byte and scalar rows", lambda: (rms(low, (3, 64)), rms(low, (2, 5, 100)))),
        ("rope: 16-byte and pair paths", lambda: (rope(low, 2, 5, 3, 64), rope(f32, 1, 4, 2, 6))),
        ("attention: GQA, causal, ragged tail", lambda: attn(attn_low, 1, 37, 37, 4, 2, 64, True)),
        ("attention: packed, empty segments", lambda: attn(half, 1, 41, 41, 4, 2, 32, True, [0, 9, 9, 40, 41])),
        ("attention: decode against a cache", lambda: attn(f32, 2, 1, 45, 4, 1, 16, True)),
        ("attention: Tq < Tk, not causal, D=128", lambda: attn(attn_low, 1, 9, 70, 2, 2, 128, False)),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    args = p.parse_args()
    if not K.AVAILABLE:
        sys.exit("sanitize_cases: llama2_C is not built")
    device = torch.device(args.device)
    if device.type == "cuda" and not K.has_cuda():
        sys.exit("sanitize_cases: llama2_C has no CUDA kernels")
    torch.manual_seed(0)
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, run in cases(device, low):
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"ok  {name}", flush=True)


if __name__ == "__main__":
    main()
