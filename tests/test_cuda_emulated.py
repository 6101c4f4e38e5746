"""The CUDA kernels (csrc/cuda/*_kernels.cuh) run on the CPU, against float64 references.

No GPU needed: tests/cuda_emu/simt.h compiles the real kernel code as C++ with a fiber per CUDA
thread, barriers for __syncthreads/__syncwarp, shuffles (registers only, no memory ordering),
atomics, dynamic and static shared memory per block (poisoned with NaN before every block) and
warp-wide reference WMMA that checks alignment and leading dimensions. The runner is built with
ThreadSanitizer, so a read of shared memory racing a write in the same barrier epoch fails the test
as a race, and so does a race between blocks (they run interleaved). The host logic is the .cu
files' own: the runner calls the same *_launch functions and attn_params of the kernel headers
(which kernel, grid, block, shared memory, parameters); see tests/cuda_emu/runner.cpp.

Each output must be within twice the error of the PyTorch reference run in the kernel's dtype
(flash-attention's rule, as in test_kernels_cuda.py), both measured against float64.
test_seeded_bugs_are_caught shows that the emulation fails when it should, on copies of the
kernels with a seeded bug (MUTATIONS): a removed __syncthreads or __syncwarp (a race in shared
memory, also where only a shuffle stood between the write and the read), dQ summed without atomics
and RMSNorm blocks redoing each other's rows (races between blocks in global memory), a wrong GQA
head mapping and launch grids that miss work (wrong numbers) and a WMMA store whose leading
dimension breaks the alignment rule.

    python -m pytest -q tests/test_cuda_emulated.py
"""
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import llama2

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLACK = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
HEAD_DIMS = (16, 32, 48, 64, 128)


@pytest.fixture(scope="module")
def runner():
    """The runner for the numbers: every dtype and head dim, no ThreadSanitizer (fast)."""
    return emu.build(tsan=False, head_dims=HEAD_DIMS)


@pytest.fixture(scope="module")
def tsan_runner():
    """The runner with ThreadSanitizer (about 10x slower), for the race checks."""
    return emu.build(tsan=True, head_dims=(16, 64), dtypes=("f32", "bf16"))


def assert_rule(name, got, ref64, ref_low):
    """got within twice ref_low's own error against ref64, plus a small slack."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    got64 = got.double()
    assert torch.isfinite(got64).all(), f"{name}: NaN/inf in the kernel's output"
    err = (got64 - ref64).abs().max().item() if got.numel() else 0.0
    base = (ref_low.double() - ref64).abs().max().item() if got.numel() else 0.0
    slack = SLACK.get(ref_low.dtype, 1e-5) * max(1.0, ref64.abs().max().item() if got.numel() else 1.0)
    assert err <= 2 * base + slack, (f"{name} ({got.dtype}): kernel error {err:.3g} > "
                                     f"2 x reference error {base:.3g} + {slack:.1g}")


def grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))


# ---------------------------------------------------------------------------------------------
# RMSNorm: forward and backward kernels, 16-byte vector path and scalar path, grid-stride rows
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,vec", [(5, 64, True), (7, 100, False), (3, 1000, True), (1, 8, True)])
def test_rms_norm(runner, dtype, N, C, vec):
    torch.manual_seed(0)
    x = torch.randn(N, C).to(dtype)
    w = (1 + 0.5 * torch.randn(C)).to(dtype)
    g = torch.randn(N, C).to(dtype)
    eps = 1e-5
    fwd = emu.run(runner, "rms_fwd", dtype, {"x": x, "w": w},
                  {"out": ((N, C), dtype), "rstd": ((N,), torch.float32)},
                  N=N, C=C, eps=eps, vec=vec, grid=2)
    bwd = emu.run(runner, "rms_bwd", dtype, {"g": g, "x": x, "w": w, "rstd": fwd["rstd"]},
                  {"dx": ((N, C), dtype), "dw": ((C,), dtype)}, N=N, C=C, vec=vec, grid=2)
    rstd64 = torch.rsqrt(x.double().pow(2).mean(-1) + eps)
    torch.testing.assert_close(fwd["rstd"].double(), rstd64, rtol=1e-5, atol=0)
    ref = lambda a, b: llama2.ref_rms_norm(a, b, eps)
    r64 = grads(ref, [x.double(), w.double()], g.double())
    low = grads(ref, [x, w], g)
    for name, got, a, b in zip(("out", "dx", "dw"), (fwd["out"], bwd["dx"], bwd["dw"]), r64, low):
        assert_rule(name, got, a, b)


# ---------------------------------------------------------------------------------------------
# RoPE: vector and pair paths, float32 or same-dtype tables, forward and inverse
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D,vec,table32,Hx", [(2, 5, 3, 16, True, True, 3), (1, 7, 2, 64, True, False, 3),
                                                    (2, 3, 3, 6, False, True, 3), (1, 4, 1, 32, False, False, 1),
                                                    (2, 6, 2, 32, True, True, 5)])
def test_rope(runner, dtype, B, T, H, D, vec, table32, Hx):
    # Hx > H: x is the first H heads of a (B, T, Hx, D) tensor (q of a fused projection).
    torch.manual_seed(0)
    P = 3 * T
    xbuf = torch.randn(B, T, Hx, D).to(dtype)
    x = xbuf[:, :, :H]
    pos = torch.randint(0, P, (B, T))
    cos64, sin64 = llama2.rope_table(D, P, dtype=torch.float64)
    tdt = torch.float32 if table32 else dtype
    cos, sin = cos64.to(tdt), sin64.to(tdt)
    for inverse in (False, True):
        got = emu.run(runner, "rope", dtype, {"x": xbuf, "pos": pos, "cos": cos, "sin": sin},
                      {"out": ((B, T, H, D), dtype)}, B=B, T=T, H=H, Hx=Hx, D=D, P=P, inverse=inverse,
                      vec=vec, table="f32" if table32 else "same", blocks=2)["out"]
        s = -1 if inverse else 1
        ref64 = llama2.ref_rope(x.double(), pos, cos.double(), s * sin.double())
        low = llama2.ref_rope(x, pos, cos, s * sin)
        assert_rule(f"rope inverse={inverse}", got, ref64, low)


def test_rope_position_outside_the_table_is_a_device_assert(runner):
    x = torch.randn(1, 2, 1, 16)
    cos, sin = torch.ones(4, 8), torch.zeros(4, 8)
    with pytest.raises(emu.EmulatorError, match="device assertion failed: p >= 0 && p < P"):
        emu.run(runner, "rope", torch.float32, {"x": x, "pos": torch.tensor([[0, 4]]), "cos": cos, "sin": sin},
                {"out": ((1, 2, 1, 16), torch.float32)}, B=1, T=2, H=1, D=16, P=4, inverse=False,
                vec=True, table="f32", blocks=1)


# ---------------------------------------------------------------------------------------------
# Attention: forward (out, lse) and backward (dq, dk, dv)
# ---------------------------------------------------------------------------------------------

def lse_reference(q, k, causal, cu_seqlens, scale):
    """log-sum-exp of each row's visible scaled scores, float64, (B, H, Tq); -inf for no key."""
    B, Tq, H, D = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(H // KV, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * scale
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    mask = torch.ones(Tq, Tk, dtype=torch.bool)
    if cu_seqlens is not None:
        ids = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        mask &= ids[:, None] == ids[None, :]
    if causal:
        mask &= j <= i + Tk - Tq
    return torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1)


def attention_case(runner, dtype, B, Tq, Tk, H, KV, D, causal, cu_seqlens=None, vec=True, backward=True,
                   fused=False):
    """out and lse, then dq, dk, dv, of the emulated kernels against the float64 reference.
    fused: q, k, v are head slices of one (B, T, H + 2 KV, D) tensor, as the model's fused
    projection would give (strides, not copies)."""
    torch.manual_seed(B * 1000 + Tq * 10 + Tk + H + D)
    q = torch.randn(B, Tq, H, D).to(dtype)
    k = torch.randn(B, Tk, KV, D).to(dtype)
    v = torch.randn(B, Tk, KV, D).to(dtype)
    g = torch.randn(B, Tq, H, D).to(dtype)
    scale = 1 / math.sqrt(D)
    keys = dict(B=B, Tq=Tq, Tk=Tk, H=H, KV=KV, D=D, causal=causal, scale=repr(scale),
                nseq=0 if cu_seqlens is None else len(cu_seqlens) - 1, vec=vec, fused=fused)
    ins = {"qkv": torch.cat([q, k, v], dim=2)} if fused else {"q": q, "k": k, "v": v}
    if cu_seqlens is not None:
        ins["cu"] = cu_seqlens
    fwd = emu.run(runner, "attn_fwd", dtype, ins,
                  {"out": ((B, Tq, H, D), dtype), "lse": ((B, H, Tq), torch.float32)}, **keys)
    torch.testing.assert_close(fwd["lse"].double(), lse_reference(q, k, causal, cu_seqlens, scale),
                               rtol=1e-4, atol=1e-4)
    ref = lambda a, b, c: llama2.ref_attention(a, b, c, causal=causal, cu_seqlens=cu_seqlens)
    if Tk == 0:  # no key at all: out = 0, lse = -inf
        assert (fwd["out"] == 0).all()
        return
    r64 = grads(ref, [q.double(), k.double(), v.double()], g.double())
    low = grads(ref, [q, k, v], g)
    assert_rule("out", fwd["out"], r64[0], low[0])
    if not backward:
        return
    bwd = emu.run(runner, "attn_bwd", dtype, {**ins, "out": fwd["out"], "dout": g, "lse": fwd["lse"]},
                  {"dq": ((B, Tq, H, D), torch.float32), "dk": ((B, Tk, KV, D), dtype),
                   "dv": ((B, Tk, KV, D), dtype)}, **keys)
    for name, got, a, b in zip(("dq", "dk", "dv"), (bwd["dq"].to(dtype), bwd["dk"], bwd["dv"]), r64[1:], low[1:]):
        assert_rule(name, got, a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_attention_gqa_causal_ragged(runner, dtype, D):
    # GQA (6 query heads on 2 KV heads), a ragged tail (37 rows: not a multiple of any tile).
    attention_case(runner, dtype, B=2, Tq=37, Tk=37, H=6, KV=2, D=D, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_full_and_unaligned_loads(runner, dtype):
    # Not causal, scalar (non-16-byte) tile loads, multi-query (4 query heads on 1 KV head).
    attention_case(runner, dtype, B=1, Tq=33, Tk=70, H=4, KV=1, D=32, causal=False, vec=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_strided_views_of_a_fused_projection(runner, dtype):
    # q, k, v as head slices of one (B, T, H + 2 KV, D) tensor: batch and token strides are not
    # those of q's own shape.
    attention_case(runner, dtype, B=2, Tq=21, Tk=21, H=4, KV=2, D=48, causal=True, fused=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_kv_cache_offset_and_decode(runner, dtype):
    # Causal, bottom-right aligned: 9 new queries after 60 cached keys; then one-token decode.
    attention_case(runner, dtype, B=1, Tq=9, Tk=69, H=4, KV=2, D=64, causal=True)
    attention_case(runner, dtype, B=2, Tq=1, Tk=45, H=2, KV=1, D=16, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_varlen_with_empty_segments(runner, dtype, causal):
    # Packed sequences with two empty segments and one longer than a tile.
    cu = torch.tensor([0, 5, 5, 40, 41, 41, 58], dtype=torch.int32)
    attention_case(runner, dtype, B=1, Tq=58, Tk=58, H=4, KV=2, D=32, causal=causal, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_rows_with_no_key(runner, dtype):
    # Tk = 0: every row is fully masked; out must be 0 and lse -inf (no NaN from 0/0).
    attention_case(runner, dtype, B=1, Tq=5, Tk=0, H=2, KV=1, D=16, causal=False)


# ---------------------------------------------------------------------------------------------
# Races: the same kernels under ThreadSanitizer (shared and global memory, every barrier epoch)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_races_rms_norm_rope(tsan_runner, dtype):
    test_rms_norm(tsan_runner, dtype, 3, 64, True)
    test_rms_norm(tsan_runner, dtype, 2, 40, False)
    test_rope(tsan_runner, dtype, 1, 3, 2, 16, True, True, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_races_attention(tsan_runner, dtype):
    # GQA, causal, a ragged tail, more than one key tile: forward and backward.
    attention_case(tsan_runner, dtype, B=1, Tq=20, Tk=37, H=4, KV=2, D=16, causal=True)
    # Packed sequences with an empty one, head dim 64.
    cu = torch.tensor([0, 7, 7, 18], dtype=torch.int32)
    attention_case(tsan_runner, dtype, B=1, Tq=18, Tk=18, H=2, KV=1, D=64, causal=True, cu_seqlens=cu)


# ---------------------------------------------------------------------------------------------
# The emulation fails when it should: seeded bugs in copies of the kernels
# ---------------------------------------------------------------------------------------------

ATTN = "attention_kernels.cuh"
RMS = "rms_norm_kernels.cuh"

# name: (kernel header, text before, text after, what runs, how it must fail). "race": a
# ThreadSanitizer report; "wrong": an assertion on the numbers; "wmma": the WMMA rule's message.
MUTATIONS = {
    # The barrier between loading a K/V tile and the warps reading it: a race on shared memory.
    "removed __syncthreads": (ATTN,
        "    load_tile<T, D, BN, NT>(Vs, LDT, vb, p.v_st, n0, p.Tk, p.v_vec);\n    __syncthreads();\n",
        "    load_tile<T, D, BN, NT>(Vs, LDT, vb, p.v_st, n0, p.Tk, p.v_vec);\n",
        "attn_fwd", "race"),
    # Query head h reads K/V head h % KV instead of h / (H / KV): wrong numbers with GQA.
    "wrong GQA head mapping": (ATTN,
        "  const int kv_head = h / (p.H / p.KV);\n",
        "  const int kv_head = h % p.KV;\n",
        "attn_fwd", "wrong"),
    # The warp barrier between the score product (WMMA stores) and the softmax that reads the
    # scores of its row from the other lanes' stores: a race within a warp.
    "removed __syncwarp": (ATTN,
        "    __syncwarp();\n\n    // Online softmax",
        "\n    // Online softmax",
        "attn_fwd", "race"),
    # The warp barrier between the P stores and the P @ V product that reads every lane's P: a race
    # within a warp, caught only because a shuffle (the row sum's, in between) orders no memory.
    "removed __syncwarp before P @ V": (ATTN,
        "    m = m_new;\n    __syncwarp();\n",
        "    m = m_new;\n",
        "attn_fwd", "race"),
    # dQ summed over key tiles (blocks) with a plain += instead of atomicAdd: a race between
    # blocks on global memory (the sums come out right here, as fibers never interleave inside
    # one statement; ThreadSanitizer sees the unordered writes).
    "non-atomic dQ sum": (ATTN,
        "          atomicAdd(p.dq_accum + ((static_cast<int64_t>(b) * p.Tq + i) * p.H + h) * D + col,\n"
        "                    p.scale * Sc[(warp * 16 + r) * LDS + col]);\n",
        "          p.dq_accum[((static_cast<int64_t>(b) * p.Tq + i) * p.H + h) * D + col] +=\n"
        "              p.scale * Sc[(warp * 16 + r) * LDS + col];\n",
        "attn_bwd", "race"),
    # A WMMA store with a leading dimension that is not a multiple of 16 bytes.
    "bad WMMA leading dimension": (ATTN,
        "      wmma::store_matrix_sync(c + nn * 16, acc, ldc, wmma::mem_row_major);\n",
        "      wmma::store_matrix_sync(c + nn * 16, acc, ldc + 2, wmma::mem_row_major);\n",
        "attn_fwd", "wmma"),
    # RMSNorm's row loop strides by one block instead of the grid: blocks redo each other's rows
    # and write the same outputs (the same values, so only the race between blocks shows; that
    # needs the blocks interleaved, each with its own static shared array).
    "RMSNorm rows not grid-strided": (RMS,
        "  const int n_vec = C / VEC;\n  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {\n"
        "    const V* xr",
        "  const int n_vec = C / VEC;\n  for (int64_t row = blockIdx.x; row < N; row += 1) {\n"
        "    const V* xr",
        "rms", "race"),
    # Host side (the launch logic the .cu files share with the emulator): the forward's grid
    # rounds the query tiles down, so the ragged last tile is never computed.
    "forward grid rounds down": (ATTN,
        "  const dim3 grid((p.Tq + L::BM - 1) / L::BM, p.H, p.B);\n",
        "  const dim3 grid(p.Tq / L::BM, p.H, p.B);\n",
        "attn_fwd", "wrong"),
    # Host side: dw summed over one block's partial sums too few.
    "RMSNorm dw misses a block": (RMS,
        "         static_cast<const float*>(partial), dw, grid, C);\n",
        "         static_cast<const float*>(partial), dw, grid - 1, C);\n",
        "rms", "wrong"),
}


def mutated_runner(tmp_path, name):
    header, before, after = MUTATIONS[name][:3]
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    for n in emu.KERNEL_HEADERS:
        shutil.copy(emu.KERNELS / n, kdir / n)
    src = (kdir / header).read_text()
    assert src.count(before) == 1, f"the seeded bug '{name}' no longer matches the kernel source"
    (kdir / header).write_text(src.replace(before, after))
    tag = "_" + re.sub(r"\W+", "_", name)
    return emu.build(tsan=True, head_dims=(16,), dtypes=("bf16",), kernel_dir=kdir, tag=tag)


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_seeded_bugs_are_caught(tmp_path, name):
    binary = mutated_runner(tmp_path, name)
    what, expect = MUTATIONS[name][3:]
    with pytest.raises((emu.EmulatorError, AssertionError)) as info:
        if what == "rms":
            test_rms_norm(binary, torch.bfloat16, N=5, C=64, vec=True)
        else:
            attention_case(binary, torch.bfloat16, B=1, Tq=40, Tk=40, H=4, KV=2, D=16, causal=True,
                           backward=what == "attn_bwd")
    if expect == "race":
        assert isinstance(info.value, emu.EmulatorError) and "data race" in info.value.stderr, info.value
    elif expect == "wmma":
        assert isinstance(info.value, emu.EmulatorError), info.value
        assert "store_matrix_sync: ldm 70 is not a multiple of 16 bytes" in info.value.stderr, info.value
    else:
        assert isinstance(info.value, AssertionError), info.value


def test_cu_files_launch_only_through_the_shared_launch_functions():
    # Every launch goes through the *_launch functions of the kernel headers, which the emulator
    # runs too; a <<<>>> written in a .cu file would be launch logic no emulated test exercises.
    for cu in sorted(emu.KERNELS.glob("*.cu")):
        assert "<<<" not in cu.read_text(), (f"{cu.name} launches a kernel itself; put the launch in a "
                                             "*_launch function of its kernel header")
