"""CUDA kernels (csrc/cuda/*.cu) against the PyTorch references in llama2.py, run in float64.

The rule for each output and gradient (flash-attention's): the kernel's largest error against the
float64 reference is at most twice the error of the PyTorch reference run in the kernel's own dtype
(float32, float16 or bfloat16) on the same inputs, plus a tiny absolute slack. Inputs are rounded to
that dtype first, so both sides see exactly the same numbers.

Every test goes through llama2_kernels (rms_norm, rope, attention), so the autograd formulas and
the backward ops are exercised too. Skipped only when this machine has no CUDA GPU.

    python -m pytest -q tests/test_kernels_cuda.py
"""
import math

import pytest
import torch

import llama2
import llama2_kernels as K

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU on this machine: the CUDA kernels cannot run")

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute slack on top of twice the reference's own error, per unit of the output's magnitude.
SLACK = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _cuda_seed():
    torch.manual_seed(0)
    torch.cuda.manual_seed(0)


def poison_allocator():
    """Fill freed GPU memory with NaN, so an output element the kernel forgot to write shows up."""
    # One large block and many small ones: the caching allocator keeps separate pools for them.
    junk = [torch.full((16 << 20,), float("nan"), device=DEV)]
    junk += [torch.full((1 << 16,), float("nan"), device=DEV) for _ in range(32)]
    del junk


def assert_rule(name, got, ref64, ref_lowp):
    """got (kernel, low precision) vs ref64 (float64 reference) within 2x ref_lowp's own error."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: the kernel returned NaN/inf"
    err = (got.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item()
    slack = SLACK[got.dtype] * max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + slack, (f"{name} ({got.dtype}): kernel error {err:.3g} > "
                                     f"2 x reference error {base:.3g} + {slack:.1g}")


def grads(fn, inputs, grad_out):
    """Output and input gradients of fn(*inputs) for the upstream gradient grad_out."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))


def three_ways(kernel_fn, ref_fn, inputs, grad_out, names):
    """Compares the kernel against float64 and low-precision references, output and grads."""
    poison_allocator()
    got = grads(kernel_fn, inputs, grad_out)
    ref64 = grads(ref_fn, [t.double() for t in inputs], grad_out.double())
    low = grads(ref_fn, inputs, grad_out)
    for name, g, r, l in zip(("out",) + tuple(names), got, ref64, low):
        assert g.dtype == inputs[0].dtype, f"{name}: dtype {g.dtype}, expected {inputs[0].dtype}"
        assert_rule(name, g, r, l)


def test_extension_has_cuda_kernels():
    assert K.AVAILABLE, "llama2_C is not built: pip install --no-build-isolation -e ."
    assert K.has_cuda(), "llama2_C was built without its CUDA kernels (was nvcc found at build?)"


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 37, 256), (3, 5, 1000), (2, 3, 4096), (7, 13)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_float64(dtype, shape):
    C = shape[-1]
    x = torch.randn(shape, device=DEV).to(dtype)
    w = (1 + 0.5 * torch.randn(C, device=DEV)).to(dtype)
    g = torch.randn(shape, device=DEV).to(dtype)
    eps = 1e-5
    three_ways(lambda a, b: K.rms_norm(a, b, eps), lambda a, b: llama2.ref_rms_norm(a, b, eps),
               [x, w], g, ("grad_x", "grad_weight"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_non_contiguous_and_unaligned(dtype):
    # A transposed view (copied by the op) and a view 2 elements into its storage (scalar loads).
    base = torch.randn(64, 9, device=DEV).to(dtype)
    w = (1 + 0.5 * torch.randn(64, device=DEV)).to(dtype)
    for x in (base.t(), torch.randn(9 * 64 + 2, device=DEV).to(dtype)[2:].view(9, 64)):
        g = torch.randn(x.shape, device=DEV).to(dtype)
        three_ways(lambda a, b: K.rms_norm(a, b, 1e-5),
                   lambda a, b: llama2.ref_rms_norm(a, b, 1e-5),
                   [x, w], g, ("grad_x", "grad_weight"))


def test_rms_norm_rstd_is_float32():
    x = torch.randn(4, 96, device=DEV, dtype=torch.bfloat16)
    w = torch.ones(96, device=DEV, dtype=torch.bfloat16)
    out, rstd = torch.ops.llama2.rms_norm_fwd(x, w, 1e-5)
    assert out.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and rstd.shape == (4,)
    expect = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-5)
    torch.testing.assert_close(rstd.double(), expect, rtol=1e-5, atol=0)


def test_rms_norm_bad_inputs():
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises(RuntimeError, match="weight has 32 elements"):
        torch.ops.llama2.rms_norm_fwd(x, torch.ones(32, device=DEV), 1e-5)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.llama2.rms_norm_fwd(x, torch.ones(64, device=DEV, dtype=torch.float16), 1e-5)
    with pytest.raises(RuntimeError, match="same CUDA device|CUDA kernel"):
        torch.ops.llama2.rms_norm_fwd(x, torch.ones(64), 1e-5)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.llama2.rms_norm_fwd(x.double(), torch.ones(64, device=DEV).double(), 1e-5)
    _out, rstd = torch.ops.llama2.rms_norm_fwd(x, torch.ones(64, device=DEV), 1e-5)
    with pytest.raises(RuntimeError, match="rstd has 3 elements"):
        torch.ops.llama2.rms_norm_bwd(x, x, torch.ones(64, device=DEV), rstd[:3])


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------

def rope_inputs(B, T, H, D, dtype, P=64, table_dtype=torch.float32):
    x = torch.randn(B, T, H, D, device=DEV).to(dtype)
    positions = torch.randint(0, P, (B, T), device=DEV)
    cos, sin = llama2.rope_table(D, P, device=DEV, dtype=table_dtype)
    return x, positions, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 32), (2, 37, 3, 64), (1, 19, 4, 128), (2, 5, 3, 6)])
def test_rope_matches_float64(dtype, B, T, H, D):
    x, positions, cos, sin = rope_inputs(B, T, H, D, dtype)
    g = torch.randn(x.shape, device=DEV).to(dtype)
    # The table is float64 for the float64 reference, float32 otherwise (as the model builds it).
    cos64, sin64 = llama2.rope_table(D, cos.shape[0], device=DEV, dtype=torch.float64)

    def ref(a):
        t = (cos64, sin64) if a.dtype == torch.float64 else (cos, sin)
        return llama2.ref_rope(a, positions, *t)

    three_ways(lambda a: K.rope(a, positions, cos, sin), ref, [x], g, ("grad_x",))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_table_in_input_dtype(dtype):
    x, positions, cos, sin = rope_inputs(2, 9, 2, 64, dtype, table_dtype=dtype)
    got = K.rope(x, positions, cos, sin)
    ref = llama2.ref_rope(x, positions, cos, sin)  # same bf16/fp16 table, float32 arithmetic
    eps = torch.finfo(dtype).eps  # one rounding step apart at most (FMA vs separate multiplies)
    torch.testing.assert_close(got, ref, rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_strided_views(dtype):
    # q out of a fused (B, T, 3H, D) projection (aligned strides, vector path), and a view one
    # element into its storage (unaligned, scalar path).
    B, T, H, D, P = 2, 11, 2, 64, 32
    fused = torch.randn(B, T, 3 * H, D, device=DEV).to(dtype)
    shifted = torch.randn(B * T * H * D + 1, device=DEV).to(dtype)[1:].view(B, T, H, D)
    positions = torch.randint(0, P, (B, T), device=DEV)
    cos, sin = llama2.rope_table(D, P, device=DEV)
    for x in (fused[:, :, H:2 * H], shifted):
        got = K.rope(x, positions, cos, sin)
        table64 = llama2.rope_table(D, P, device=DEV, dtype=torch.float64)
        ref64 = llama2.ref_rope(x.double(), positions, *table64)
        assert_rule("rope strided", got, ref64, llama2.ref_rope(x, positions, cos, sin))


def test_rope_inverse_undoes_forward():
    x, positions, cos, sin = rope_inputs(2, 8, 2, 64, torch.float32)
    y = torch.ops.llama2.rope(x, positions, cos, sin, False)
    back = torch.ops.llama2.rope(y, positions, cos, sin, True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_rope_bad_inputs():
    # Positions outside the table are not checked on the host (that would sync every call): the
    # caller validates them; the kernel's device assert (tests/test_cuda_emulated.py) guards.
    x, positions, cos, sin = rope_inputs(1, 4, 2, 64, torch.float32, P=8)
    with pytest.raises(RuntimeError, match="D/2"):
        K.rope(x, positions, cos[:, :16], sin[:, :16])
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.llama2.rope(x[..., :5], positions, cos[:, :2], sin[:, :2], False)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.llama2.rope(x, positions.int(), cos, sin, False)
    with pytest.raises(RuntimeError, match="same CUDA device|CUDA kernel"):
        torch.ops.llama2.rope(x, positions.cpu(), cos, sin, False)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attention_check(q, k, v, causal, cu_seqlens=None):
    """Kernel vs float64 and low-precision references: out, dq, dk, dv."""
    g = torch.randn(q.shape, device=DEV).to(q.dtype)
    three_ways(lambda a, b, c: K.attention(a, b, c, causal=causal, cu_seqlens=cu_seqlens),
               lambda a, b, c: llama2.ref_attention(a, b, c, causal=causal, cu_seqlens=cu_seqlens),
               [q, k, v], g, ("dq", "dk", "dv"))


def qkv(B, Tq, Tk, H, KV, D, dtype):
    q = torch.randn(B, Tq, H, D, device=DEV).to(dtype)
    k = torch.randn(B, Tk, KV, D, device=DEV).to(dtype)
    v = torch.randn(B, Tk, KV, D, device=DEV).to(dtype)
    return q, k, v


# (B, Tq, Tk, H, KV): T=1, one key; decoding one query against a cache; sizes that are not a
# multiple of any tile; Tq < Tk (bottom-right causal offset); MHA, GQA and MQA; several key tiles.
SHAPES = [
    (1, 1, 1, 2, 1),
    (2, 1, 37, 4, 2),
    (2, 37, 37, 4, 4),
    (1, 70, 70, 4, 2),
    (2, 20, 85, 4, 1),
    (1, 3, 130, 2, 2),
    (1, 129, 129, 8, 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 32, 48, 64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Tq{}_Tk{}_H{}_KV{}".format(*s))
def test_attention_matches_float64(dtype, D, causal, shape):
    B, Tq, Tk, H, KV = shape
    attention_check(*qkv(B, Tq, Tk, H, KV, D, dtype), causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_packed_equals_per_sequence(dtype, causal):
    # Uneven packed sequences, one of them empty and one of length 1; D = 64, GQA.
    lens = [5, 0, 33, 1, 70, 11]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    T, H, KV, D = sum(lens), 4, 2, 64
    q, k, v = qkv(1, T, T, H, KV, D, dtype)
    attention_check(q, k, v, causal, cu)
    # The packed output equals running each sequence on its own (the float64 reference per piece).
    got = K.attention(q, k, v, causal=causal, cu_seqlens=cu).double()
    pieces = []
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        qs, ks, vs = (t[:, a:b].double() for t in (q, k, v))
        pieces.append(llama2.ref_attention(qs, ks, vs, causal=causal))
    ref64 = torch.cat(pieces, dim=1)
    low = llama2.ref_attention(q, k, v, causal=causal, cu_seqlens=cu)
    assert_rule("packed out vs per-sequence", got.to(dtype), ref64, low)


def test_attention_packed_cu_seqlens_on_cpu():
    lens = [9, 40, 15]
    cu = torch.tensor([0, 9, 49, 64], dtype=torch.int32)
    q, k, v = qkv(1, 64, 64, 2, 1, 32, torch.bfloat16)
    a = K.attention(q, k, v, causal=True, cu_seqlens=cu)
    b = K.attention(q, k, v, causal=True, cu_seqlens=cu.to(DEV))
    assert sum(lens) == 64 and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_strided_inputs(dtype):
    # q/k/v sliced out of one fused projection (B, T, H + 2 KV, D): strided, 16-byte aligned.
    B, T, H, KV, D = 2, 45, 4, 2, 64
    fused = torch.randn(B, T, H + 2 * KV, D, device=DEV).to(dtype)
    q, k, v = fused[:, :, :H], fused[:, :, H:H + KV], fused[:, :, H + KV:]
    assert not k.is_contiguous()
    attention_check(q, k, v, True)
    # K/V views one element into their storage: unaligned rows take the scalar loads.
    n = B * T * KV * D
    k2 = torch.randn(n + 1, device=DEV).to(dtype)[1:].view(B, T, KV, D)
    v2 = torch.randn(n + 3, device=DEV).to(dtype)[3:].view(B, T, KV, D)
    attention_check(q, k2, v2, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_lse(dtype):
    q, k, v = qkv(2, 19, 40, 4, 2, 64, dtype)
    scale = 1 / 8
    out, lse = torch.ops.llama2.attention_fwd(q, k, v, None, scale, True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 19)
    # lse[b, h, i] = logsumexp over visible keys of scale * q.k (float64, K/V head h // 2)
    kk = k.double().repeat_interleave(2, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * scale
    allowed = torch.ones(19, 40, dtype=torch.bool, device=DEV).tril(40 - 19)
    ref = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.double(), ref, rtol=0, atol=atol)


def test_attention_long_sequence_bf16():
    # Many key tiles per query tile and many query tiles per key tile (one head, D = 128).
    attention_check(*qkv(1, 600, 600, 2, 1, 128, torch.bfloat16), True)


def test_attention_bad_inputs():
    q, k, v = qkv(1, 8, 8, 4, 2, 64, torch.float16)
    op = torch.ops.llama2.attention_fwd
    with pytest.raises(RuntimeError, match="head dim 16, 32, 48, 64 or 128"):
        op(q[..., :40], k[..., :40], v[..., :40], None, 0.1, True)
    with pytest.raises(RuntimeError, match="multiple of the number of key/value heads"):
        op(q[:, :, :3], k, v, None, 0.1, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(q, k.float(), v, None, 0.1, True)
    with pytest.raises(RuntimeError, match="same CUDA device|CUDA kernel"):
        op(q, k.cpu(), v, None, 0.1, True)
    with pytest.raises(RuntimeError, match="k has shape"):
        op(q, k, v[:, :5], None, 0.1, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(q.double(), k.double(), v.double(), None, 0.1, True)
    with pytest.raises(RuntimeError, match="B == 1"):
        op(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
           torch.tensor([0, 8], dtype=torch.int32, device=DEV), 0.1, True)
    # The values of a CPU cu_seqlens are checked for free; a CUDA one is not read back (no sync).
    with pytest.raises(RuntimeError, match="end at the token count"):
        op(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 0.1, True)
    with pytest.raises(RuntimeError, match="nondecreasing"):
        op(q, k, v, torch.tensor([0, 5, 3, 8], dtype=torch.int32), 0.1, True)
    with pytest.raises(RuntimeError, match="int32"):
        op(q, k, v, torch.tensor([0, 8], device=DEV), 0.1, True)
    with pytest.raises(RuntimeError, match="causal attention needs Tq <= Tk"):
        op(q, k[:, :4], v[:, :4], None, 0.1, True)
    out, lse = op(q, k, v, None, 0.1, True)
    with pytest.raises(RuntimeError, match="lse has shape"):
        torch.ops.llama2.attention_bwd(out, q, k, v, out, lse[:, :2], None, 0.1, True)


# ---------------------------------------------------------------------------------------------
# The ops as PyTorch sees them: schema, fake kernels, autograd registration
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(3, 5, 64, device=DEV, dtype=dtype, requires_grad=True)
    w = torch.randn(64, device=DEV, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.llama2.rms_norm_fwd.default, (x, w, 1e-5))
    xr = torch.randn(2, 5, 2, 32, device=DEV, dtype=dtype, requires_grad=True)
    pos = torch.randint(0, 16, (2, 5), device=DEV)
    cos, sin = llama2.rope_table(32, 16, device=DEV)
    torch.library.opcheck(torch.ops.llama2.rope.default, (xr, pos, cos, sin, False))
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 17, 17, 4, 2, 32, dtype))
    scale = 1 / math.sqrt(32)
    torch.library.opcheck(torch.ops.llama2.attention_fwd.default, (q, k, v, None, scale, True))
    cu = torch.tensor([0, 6, 17], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.llama2.attention_fwd.default, (q, k, v, cu, scale, False))


def test_no_host_sync_per_call():
    # Issue 15: no op reads device memory back. PyTorch's sync debug mode raises on any
    # synchronizing call (.item(), .cpu(), a blocking copy) made while it is on.
    x, positions, cos, sin = rope_inputs(2, 16, 4, 64, torch.bfloat16, P=64)
    w = torch.randn(64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv(1, 32, 32, 4, 2, 64, torch.bfloat16)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    cu = torch.tensor([0, 10, 10, 32], dtype=torch.int32, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = K.rope(x, positions, cos, sin)
        z = K.rms_norm(x.detach().requires_grad_(True), w, 1e-5)
        torch.autograd.grad(z.float().sum(), w)
        out = K.attention(q, k, v, causal=True, cu_seqlens=cu)
        torch.autograd.grad(out.float().sum(), (q, k, v))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(out).all()
