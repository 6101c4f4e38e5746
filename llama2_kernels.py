"""Python side of the compiled extension llama2_C: autograd, fake kernels and friendly wrappers.

The C++/CUDA kernels register themselves as torch.ops.llama2.* when llama2_C is imported (schemas in
csrc/ops.cpp). This module adds what makes them first-class PyTorch ops:
- autograd formulas (torch.library.register_autograd), each made of the backward ops,
- fake (meta) kernels (torch.library.register_fake), so torch.compile(fullgraph=True) can trace them,
- CPU autocast rules (an AutocastCPU kernel per forward op), so that under
  torch.autocast("cpu", torch.bfloat16) the kernels run in bfloat16, like the matmuls around them,
- the wrappers llama2.py calls: rms_norm, rope, attention.
The statistics the forwards save for their backwards (RMSNorm's rstd, attention's lse) are float32,
except float64 for float64 inputs on CPU, so that gradcheck in float64 is exact.

If llama2_C is not built, AVAILABLE is False and llama2.py runs its plain PyTorch reference path.

    import llama2_kernels as K
    if K.AVAILABLE and K.supports(q, k, v):
        out = K.attention(q, k, v, causal=True)
"""
import math
import os
import shutil
from typing import Optional

import torch

try:
    import llama2_C  # noqa: F401  (importing it registers torch.ops.llama2.*)
    AVAILABLE = True
except ImportError as e:  # not built (or built for another torch): the reference path is used
    AVAILABLE = False
    IMPORT_ERROR = str(e)

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # bfloat16: float32 arithmetic
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled into llama2_C (not merely when a GPU exists)."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("llama2::rope", "CUDA")


def has_cuda_build_expected() -> bool:
    """True when setup.py should have compiled the CUDA kernels: a CUDA build of torch and nvcc found."""
    if torch.version.cuda is None or os.environ.get("LLAMA2_NO_CUDA") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the extension has a kernel for these tensors: same device, and a dtype it takes there.

    CPU: float32, float64, bfloat16. CUDA (only if compiled in): float32, float16, bfloat16.
    """
    if not AVAILABLE or not tensors:
        return False
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return False
    if device.type == "cpu":
        dtypes = _CPU_DTYPES
    elif device.type == "cuda" and has_cuda():
        dtypes = _CUDA_DTYPES
    else:
        return False
    return all(t.dtype in dtypes for t in tensors)


_CUDA_HEAD_DIMS = (16, 32, 48, 64, 128)  # the head sizes the CUDA attention kernels are built for
_CPU_MAX_HEAD_DIM = 256


def supports_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """supports(q, k, v), and the head size is one the attention kernel of that device takes."""
    if not supports(q, k, v) or not (q.dtype == k.dtype == v.dtype):
        return False
    D = q.shape[-1]
    if q.device.type == "cuda":
        return D in _CUDA_HEAD_DIMS
    return 1 <= D <= _CPU_MAX_HEAD_DIM


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # rstd and lse: float32, except float64 for float64 inputs (keeps gradcheck exact)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_device(op: str, **tensors) -> None:
    # The fake kernels see mixed devices first (e.g. under torch.compile), so they say it too.
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise RuntimeError(f"llama2::{op}: {first_name} is on {first.device} but {name} is on "
                               f"{t.device}; move all inputs to the same device")


if AVAILABLE:
    # ---- fake kernels: output shapes/dtypes without computing (torch.compile, meta tensors) ----

    @torch.library.register_fake("llama2::rms_norm_fwd")
    def _rms_norm_fwd_fake(x, weight, eps):
        _check_same_device("rms_norm_fwd", x=x, weight=weight)
        n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, x.new_empty((n_rows,), dtype=_stat_dtype(x.dtype))

    @torch.library.register_fake("llama2::rms_norm_bwd")
    def _rms_norm_bwd_fake(grad_out, x, weight, rstd):
        _check_same_device("rms_norm_bwd", grad_out=grad_out, x=x, weight=weight, rstd=rstd)
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(weight, memory_format=torch.contiguous_format))

    @torch.library.register_fake("llama2::rope")
    def _rope_fake(x, positions, cos, sin, inverse):
        _check_same_device("rope", x=x, positions=positions, cos=cos, sin=sin)
        return x.new_empty(x.shape)

    @torch.library.register_fake("llama2::attention_fwd")
    def _attention_fwd_fake(q, k, v, cu_seqlens, scale, causal):
        _check_same_device("attention_fwd", q=q, k=k, v=v, cu_seqlens=cu_seqlens)
        B, Tq, H, D = q.shape
        return q.new_empty((B, Tq, H, D)), q.new_empty((B, H, Tq), dtype=_stat_dtype(q.dtype))

    @torch.library.register_fake("llama2::attention_bwd")
    def _attention_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens, scale, causal):
        _check_same_device("attention_bwd", grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse,
                           cu_seqlens=cu_seqlens)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    # ---- autograd: each backward is an op of its own ----

    def _rms_norm_setup(ctx, inputs, output):
        x, weight, _eps = inputs
        _out, rstd = output
        ctx.mark_non_differentiable(rstd)  # a statistic saved for the backward, not an output
        ctx.save_for_backward(x, weight, rstd)

    def _rms_norm_backward(ctx, grad_out, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = torch.ops.llama2.rms_norm_bwd(grad_out, x, weight, rstd)
        return grad_x, grad_w, None

    torch.library.register_autograd("llama2::rms_norm_fwd", _rms_norm_backward,
                                    setup_context=_rms_norm_setup)

    def _rope_setup(ctx, inputs, output):
        _x, positions, cos, sin, inverse = inputs
        ctx.save_for_backward(positions, cos, sin)
        ctx.inverse = inverse

    def _rope_backward(ctx, grad_out):
        positions, cos, sin = ctx.saved_tensors
        # A rotation's transpose is the rotation by the negative angle.
        grad_x = torch.ops.llama2.rope(grad_out, positions, cos, sin, not ctx.inverse)
        return grad_x, None, None, None, None

    torch.library.register_autograd("llama2::rope", _rope_backward, setup_context=_rope_setup)

    def _attention_setup(ctx, inputs, output):
        q, k, v, cu_seqlens, scale, causal = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)  # the backward reuses it; no gradient flows into it
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.scale, ctx.causal = scale, causal

    def _attention_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.llama2.attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens,
                                                    ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("llama2::attention_fwd", _attention_backward,
                                    setup_context=_attention_setup)

    # ---- CPU autocast: the forwards run in the autocast dtype (bfloat16), as matmuls do ----
    # Under torch.autocast("cpu", torch.bfloat16) the projections hand RoPE and attention bfloat16
    # tensors, but RMSNorm gets the float32 residual stream and would run in float32. An
    # AutocastCPU kernel per forward op casts its activations (and RMSNorm's weight) to the
    # autocast dtype, then calls the op with autocast off; autograd records the casts, so the
    # gradients flow back in float32. Why not torch.library.register_autocast: it casts every
    # floating input to one fixed dtype, RoPE's cos/sin tables included (they stay float32 here:
    # a bfloat16 table would double RoPE's error), and it would also cast under a float16 CPU
    # autocast, which these kernels do not take. Statistics (rstd, lse) stay float32. The
    # backward ops need no rule: autograd hands them gradients in their forward's dtype. CUDA
    # keeps its behaviour (no AutocastCUDA rule): it is left for a change tested on a GPU.

    _AUTOCAST_CASTS = {  # op -> the positions of the arguments cast to the autocast dtype
        "rms_norm_fwd": (0, 1),   # x, weight
        "rope": (0,),             # x; positions and the cos/sin tables as they are
        "attention_fwd": (0, 1, 2),  # q, k, v; cu_seqlens is int32
    }
    _AUTOCAST_KEY = torch._C.DispatchKey.AutocastCPU

    def _autocast_cpu_kernel(name: str):
        op = getattr(torch.ops.llama2, name).default
        cast = _AUTOCAST_CASTS[name]

        def kernel(_keyset, *args):
            dtype = torch.get_autocast_dtype("cpu")
            if dtype in _CPU_DTYPES:
                args = tuple(a.to(dtype) if i in cast and isinstance(a, torch.Tensor)
                             and a.is_floating_point() and a.device.type == "cpu" else a
                             for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_AUTOCAST_KEY)):
                return op(*args)
        return kernel

    _autocast_lib = torch.library.Library("llama2", "IMPL")
    for _name in _AUTOCAST_CASTS:
        _autocast_lib.impl(_name, _autocast_cpu_kernel(_name), "AutocastCPU", with_keyset=True)


def _need_ext(name: str) -> None:
    if not AVAILABLE:
        raise RuntimeError(f"llama2_kernels.{name}: the llama2_C extension is not built ({IMPORT_ERROR}); "
                           "run `pip install --no-build-isolation -e .` or use llama2's reference path")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last dim of x (..., C); weight (C,)."""
    _need_ext("rms_norm")
    if weight.dtype != x.dtype:
        # Mixed dtypes: compute in the promoted dtype, as the reference's `normed * weight` does.
        dtype = torch.promote_types(x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
    out, _rstd = torch.ops.llama2.rms_norm_fwd(x, weight, float(eps))
    return out


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate Meta's interleaved pairs of x (B, T, H, D) by positions (T,) or (B, T); cos/sin (P, D/2).

    positions must lie in [0, P). The CPU kernel checks that; the CUDA kernel does not read them
    back (a device-to-host sync per call) and only asserts on the device, so validate positions
    where they are made, once per step, before they go to the GPU.
    """
    _need_ext("rope")
    if x.dim() != 4:
        raise ValueError(f"rope: x must be (B, T, H, D), got shape {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[1]
    if positions.dim() not in (1, 2) or positions.shape[-1] != T:
        raise ValueError(f"rope: positions must be (T,) or (B, T) with T={T}, got shape "
                         f"{tuple(positions.shape)}")
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    positions = positions.to(torch.int64).expand(B, T)
    return torch.ops.llama2.rope(x, positions, cos, sin, False)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Flash-style grouped-query attention: q (B, Tq, H, D), k/v (B, Tk, KV, D) -> (B, Tq, H, D).

    causal is bottom-right aligned (query i sees keys j <= i + Tk - Tq); cu_seqlens (S+1,) int32
    packs S sequences into B == 1 with no attention across them; scale defaults to 1/sqrt(D).
    cu_seqlens must start at 0, never decrease and end at Tq. The CPU kernel checks that, and so
    does the CUDA one for a CPU cu_seqlens; a CUDA cu_seqlens is not read back (a device-to-host
    sync per call): validate it where it is made, once per step, and pass it on q's device. The
    CUDA kernels clamp every key range, so bad values give wrong rows, never out-of-bounds access.
    """
    _need_ext("attention")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _lse = torch.ops.llama2.attention_fwd(q, k, v, cu_seqlens, float(scale), bool(causal))
    return out
