"""Benchmark the llama2_C kernels against the eager references and the best stock PyTorch.

For each op and shape: median time of the forward and of forward+backward (after warm-up), for
  ours   llama2_kernels.{rms_norm, rope, attention} (the compiled extension)
  ref    llama2.ref_* (the eager plain-PyTorch reference, the test oracle)
  stock  the best stock PyTorch: F.rms_norm; Meta's complex-number RoPE; SDPA(enable_gqa) on the
         (B, H, T, D) layout (on CUDA the flash backend)
  compiled  torch.compile of the eager reference (RMSNorm, RoPE; on by default on CUDA, --compile)
  floor  bytes the op must move / measured copy bandwidth (RMSNorm, RoPE: memory-bound ops)
and the ratios (speedups relative to ref, and ours relative to stock). Attention also reports the
peak extra memory of one forward+backward:
  CPU  in a fresh subprocess per measurement: reset the kernel's RSS high-water mark
       (/proc/self/clear_refs = 5), run, and read VmHWM - VmRSS-before from /proc/self/status.
       Honest for torch on CPU (large blocks are mmap'ed and returned), includes the gradients.
  CUDA torch.cuda.max_memory_allocated() - memory allocated before, after reset_peak_memory_stats.

    python bench/bench_ops.py                 # CPU, < 3 min on 2 cores
    python bench/bench_ops.py --device cuda   # adds bf16 B=4 H=32 KV=8 D=128 at T=2048, 4096

On CUDA the RMSNorm and RoPE shapes are large (each input at least 4x the GPU's L2 cache, which is
50-60 MB on an H100/H200), so that the timings are of DRAM traffic, not of data left in L2 by the
previous call.
"""
import argparse
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llama2  # noqa: E402
import llama2_kernels as K  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def median_ms(fns, device, warmup=2, reps=41, budget_s=4.0):
    """Median wall time in ms of each fn in fns (a dict), after warm-up.

    The contenders run round-robin, one call each per round, so a busy machine slows them alike:
    up to `reps` rounds for fast ops (millisecond timings on a shared CPU wander by tens of
    percent from call to call), fewer (at least 3) once `budget_s` is spent.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    t_start = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
        if time.perf_counter() - t_start > budget_s and len(times[name]) >= 3:
            break
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def copy_bandwidth(device):
    """Bytes per second (read + write) of a large tensor copy: into a ready buffer (the floor for
    memory-bound ops), and into a freshly allocated one (what an op that returns a new tensor pays:
    on CPU the OS maps and zeroes fresh pages on first touch)."""
    n = 64 * 2**20 if device.type == "cpu" else 512 * 2**20  # floats: 256 MB / 2 GB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms({"copy": lambda: dst.copy_(src), "alloc": lambda: torch.empty_like(src).copy_(src)},
                   device, warmup=2, reps=7)
    return 2 * n * 4 / (ms["copy"] * 1e-3), 2 * n * 4 / (ms["alloc"] * 1e-3)


def fwd_and_fwdbwd(contenders, device):
    """{name: (forward ms, forward+backward ms)} for contenders {name: (fn, inputs)}.

    fn(*inputs) returns a tensor or a tuple of tensors; the backward gets random output grads.
    """
    fwd, fwdbwd = {}, {}
    for name, (fn, inputs) in contenders.items():
        leaves = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
        with torch.no_grad():
            outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]

        def run_fwd(fn=fn, inputs=inputs):
            with torch.no_grad():
                fn(*inputs)

        def run_fwdbwd(fn=fn, leaves=leaves, grads=grads):
            o = fn(*leaves)
            torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)
            for t in leaves:
                t.grad = None

        fwd[name], fwdbwd[name] = run_fwd, run_fwdbwd
    f, fb = median_ms(fwd, device), median_ms(fwdbwd, device)
    return {name: (f[name], fb[name]) for name in contenders}


# ---------------------------------------------------------------------------------------------
# Contenders

def meta_rope(xq, xk, freqs_cis):
    """Meta's llama/model.py apply_rotary_emb: complex multiply of interleaved pairs."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * fc).flatten(3)
    xk_out = torch.view_as_real(xk_ * fc).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def sdpa_bhtd(qt, kt, vt, backend=None):
    """Stock attention on the (B, H, T, D) layout, GQA without repeating K/V."""
    if backend is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        try:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        except RuntimeError:
            # This backend lacks native GQA: give it repeated K/V heads (costs memory, not FLOPs).
            G = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(G, dim=1), vt.repeat_interleave(G, dim=1)
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


# ---------------------------------------------------------------------------------------------
# Reporting

ROWS = []


def report(op, shape, times, floor_ms=None, extra="", alloc_floor_ms=None):
    """times: {"ours": (fwd, fwdbwd), "ref": ..., "stock": ..., optional "copy"}; one line per pass."""
    for i, pass_name in enumerate(("fwd", "fwd+bwd")):
        t = {k: v[i] for k, v in times.items()}
        ours = t["ours"]
        parts = [f"{op:9s} {shape:28s} {pass_name:8s}"]
        for k in ("ours", "ref", "stock"):
            parts.append(f"{k} {t[k]:8.2f} ms" if k in t else f"{k} {'-':>8s}   ")
        if "compiled" in t:
            parts.append(f"compiled {t['compiled']:8.2f} ms (ours {t['compiled'] / ours:5.2f}x)")
        parts.append(f"| ours vs ref {t['ref'] / ours:5.2f}x" if "ref" in t else "| ours vs ref   -  ")
        if "stock" in t:
            parts.append(f"vs stock {t['stock'] / ours:5.2f}x")
            if "ref" in t:
                parts.append(f"(stock vs ref {t['ref'] / t['stock']:4.2f}x)")
        if "copy" in t:
            # a clone of the same inputs, timed in the same rounds: what any op that reads its
            # inputs once and writes fresh outputs once can at best reach
            parts.append(f"| clone {t['copy']:7.2f} ms (stock at {t['copy'] / t['stock']:4.0%} "
                         f"of it; ours at {t['copy'] / ours:4.0%})")
        if floor_ms is not None:
            f = floor_ms[i]
            parts.append(f"| floor {f:7.2f} ms ({t['ref'] / f:4.1f}x ref; ours at {f / ours:4.0%})"
                         if "ref" in t else f"| floor {f:7.2f} ms")
            if alloc_floor_ms is not None:
                parts.append(f"| with fresh outputs {alloc_floor_ms[i]:7.2f} ms")
        if extra and i == 1:
            parts.append(extra)
        line = " ".join(parts)
        print(line, flush=True)
        ROWS.append(line)


def _tag(dtype):
    return "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"


def compiled(fn, enabled):
    """torch.compile(fn) as a baseline, or None."""
    return torch.compile(fn, dynamic=False) if enabled else None


def bench_rms_norm(device, dtype, bw, shapes=((8, 512, 768), (4, 1024, 4096)), compile_=False):
    ref_c = compiled(llama2.ref_rms_norm, compile_)
    for shape in shapes:
        x = torch.randn(*shape, device=device, dtype=dtype)
        w = torch.randn(shape[-1], device=device, dtype=dtype)
        eps = 1e-5
        contenders = {
            "ours": (lambda x, w: K.rms_norm(x, w, eps), (x, w)),
            "ref": (lambda x, w: llama2.ref_rms_norm(x, w, eps), (x, w)),
            "stock": (lambda x, w: F.rms_norm(x, (shape[-1],), w, eps), (x, w)),
        }
        if ref_c is not None:
            contenders["compiled"] = (lambda x, w: ref_c(x, w, eps), (x, w))
        times = fwd_and_fwdbwd(contenders, device)
        # fwd reads x, writes out; bwd reads grad_out and x, writes grad_x (weight is negligible)
        nbytes = x.numel() * x.element_size()
        floor = (2 * nbytes / bw[0] * 1e3, 5 * nbytes / bw[0] * 1e3)
        alloc = (2 * nbytes / bw[1] * 1e3, 5 * nbytes / bw[1] * 1e3)
        report("rms_norm", str(tuple(shape)) + _tag(dtype), times, floor, alloc_floor_ms=alloc)


def bench_rope(device, dtype, bw, shape=(8, 512, 12, 4, 64), compile_=False):
    B, T, H, KV, D = shape
    ref_c = compiled(llama2.ref_rope, compile_)
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B, T, KV, D, device=device, dtype=dtype)
    cos, sin = llama2.rope_table(D, 2 * T, device=device)
    pos = torch.arange(T, device=device).expand(B, T)
    freqs_cis = torch.polar(torch.ones_like(cos[:T]), torch.atan2(sin[:T], cos[:T]))  # (T, D/2)
    times = fwd_and_fwdbwd({
        "ours": (lambda q, k: (K.rope(q, pos, cos, sin), K.rope(k, pos, cos, sin)), (q, k)),
        "ref": (lambda q, k: (llama2.ref_rope(q, pos, cos, sin), llama2.ref_rope(k, pos, cos, sin)),
                (q, k)),
        "stock": (lambda q, k: meta_rope(q, k, freqs_cis), (q, k)),
        "copy": (lambda q, k: (q.clone(), k.clone()), (q, k)),
        **({"compiled": (lambda q, k: (ref_c(q, pos, cos, sin), ref_c(k, pos, cos, sin)), (q, k))}
           if ref_c is not None else {}),
    }, device)
    # q and k read and written once per pass
    nbytes = (q.numel() + k.numel()) * q.element_size()
    # (the clone measures what fresh outputs cost; no bandwidth estimate of it is needed)
    floor = (2 * nbytes / bw[0] * 1e3, 4 * nbytes / bw[0] * 1e3)
    report("rope", f"q{tuple(q.shape)} k {KV} heads" + _tag(dtype), times, floor)


def attention_inputs(B, T, H, KV, D, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return mk(B, T, H, D), mk(B, T, KV, D), mk(B, T, KV, D)


def attention_flops(B, T, H, D):
    fwd = 4 * B * H * T * T * D / 2  # two matmuls, causal half
    return fwd, 3.5 * fwd            # backward = 2.5x forward (five matmuls)


def measure_memory_cpu(which, B, T, H, KV, D):
    """Peak extra RSS (MB) of one attention fwd+bwd, measured in a fresh subprocess."""
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", which,
           "--shape", f"{B},{T},{H},{KV},{D}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mem_child(which, shape):
    """Runs in the subprocess: set up, reset the RSS high-water mark, one fwd+bwd, print MB."""
    B, T, H, KV, D = shape
    q, k, v = attention_inputs(B, T, H, KV, D, torch.device("cpu"), torch.float32)
    if which == "stock":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    g = torch.randn_like(q)
    fn = {"ours": lambda: K.attention(q, k, v),
          "stock": lambda: sdpa_bhtd(q, k, v),
          "ref": lambda: llama2.ref_attention(q, k, v)}[which]
    torch.set_num_threads(torch.get_num_threads())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn().backward(g)
    peak = _status_kb("VmHWM")
    print((peak - before) / 1024)


def bench_attention(device, dtype, shapes, with_ref=True, backend=None):
    for (B, T, H, KV, D) in shapes:
        q, k, v = attention_inputs(B, T, H, KV, D, device, dtype)
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        contenders = {
            "ours": (lambda q, k, v: K.attention(q, k, v), (q, k, v)),
            "stock": (lambda q, k, v: sdpa_bhtd(q, k, v, backend), (qt, kt, vt)),
        }
        if with_ref:
            contenders["ref"] = (lambda q, k, v: llama2.ref_attention(q, k, v), (q, k, v))
        times = fwd_and_fwdbwd(contenders, device)
        fl_f, fl_fb = attention_flops(B, T, H, D)
        extra = ""
        if device.type == "cuda":
            tf = lambda fl, ms: fl / (ms * 1e-3) / 1e12
            o, s = times["ours"], times["stock"]
            extra = (f"| TFLOP/s ours {tf(fl_f, o[0]):.0f}/{tf(fl_fb, o[1]):.0f} "
                     f"stock {tf(fl_f, s[0]):.0f}/{tf(fl_fb, s[1]):.0f} (fwd/fwd+bwd)")
            mem = {}
            for name, fn, args in (("ours", K.attention, (q, k, v)),
                                   ("stock", lambda a, b, c: sdpa_bhtd(a, b, c, backend), (qt, kt, vt))):
                leaves = [t.detach().requires_grad_(True) for t in args]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(*leaves).backward(torch.ones_like(leaves[0]))
                torch.cuda.synchronize()
                mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
                del leaves
            extra += f" | peak extra MB ours {mem['ours']:.0f} stock {mem['stock']:.0f}"
        else:
            gf = lambda fl, ms: fl / (ms * 1e-3) / 1e9
            o = times["ours"]
            mem = {w: measure_memory_cpu(w, B, T, H, KV, D) for w in ("ours", "stock", "ref")}
            extra = (f"| GFLOP/s ours {gf(fl_f, o[0]):.1f}/{gf(fl_fb, o[1]):.1f} (fwd/fwd+bwd) "
                     f"| peak extra RSS MB ours {mem['ours']:.0f} stock {mem['stock']:.0f} "
                     f"ref {mem['ref']:.0f}")
        report("attention", f"B{B} T{T} H{H} KV{KV} D{D} {str(dtype).split('.')[-1]}", times,
               extra=extra)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", default=None, choices=["true", "false"],
                   help="add torch.compile'd references as baselines (default: on CUDA only)")
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:
        mem_child(args.mem_child, tuple(int(s) for s in args.shape.split(",")))
        return
    if not K.AVAILABLE:
        sys.exit("bench_ops: the llama2_C extension is not built; run "
                 "`pip install --no-build-isolation -e .` first")
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and K.has_cuda()):
        sys.exit("bench_ops --device cuda: needs a GPU and llama2_C built with its CUDA kernels")
    torch.manual_seed(0)
    t0 = time.time()
    bw = copy_bandwidth(device)
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"# bench_ops on {where}, torch {torch.__version__}; copy bandwidth {bw[0] / 1e9:.1f} GB/s "
          f"({bw[1] / 1e9:.1f} GB/s into fresh memory); medians; 'x' = speedup (higher is better "
          "for ours)", flush=True)
    dtype = torch.float32
    comp = (device.type == "cuda") if args.compile is None else args.compile == "true"
    if device.type == "cuda":
        # Inputs of at least 4x the L2 cache: every call streams from DRAM.
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        rms_big, rope_big = (8, 4096, 4096), (8, 4096, 32, 8, 128)
        print(f"# L2 {l2 / 2**20:.0f} MB; RMSNorm x {math.prod(rms_big) * 4 / l2:.0f}x L2 in float32, "
              f"RoPE q {math.prod(rope_big[:3]) * rope_big[4] * 2 / l2:.0f}x L2 in bfloat16", flush=True)
        bench_rms_norm(device, dtype, bw, shapes=[rms_big], compile_=comp)
        bench_rope(device, dtype, bw, shape=rope_big, compile_=comp)
        bench_rms_norm(device, torch.bfloat16, bw, shapes=[(16, 4096, 4096)], compile_=comp)
        bench_rope(device, torch.bfloat16, bw, shape=rope_big, compile_=comp)
    else:
        bench_rms_norm(device, dtype, bw, compile_=comp)
        bench_rope(device, dtype, bw, compile_=comp)
        # bfloat16 RMSNorm and RoPE (stock: F.rms_norm in bfloat16; Meta's RoPE upcasts to float32)
        bench_rms_norm(device, torch.bfloat16, bw, shapes=[(8, 512, 768)], compile_=comp)
        bench_rope(device, torch.bfloat16, bw, compile_=comp)
    bench_attention(device, dtype, [(4, 512, 12, 4, 64), (4, 1024, 12, 4, 64)])
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend
        bench_attention(device, torch.bfloat16, [(4, 2048, 32, 8, 128), (4, 4096, 32, 8, 128)],
                        with_ref=False, backend=SDPBackend.FLASH_ATTENTION)
    print(f"# total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
