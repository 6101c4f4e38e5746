"""Resources of the attention kernels on Hopper (sm_90), checked without a GPU.

ptxas (-Xptxas -v) reports each kernel's registers and local-memory spills; the test fails on any
spill (a spill turns register traffic into memory traffic in the inner loop). cuobjdump -sass
shows whether the float16/bfloat16 kernels, whose products go through WMMA, really run on tensor
cores (HMMA instructions), and that the float32 kernels (plain FMAs) do not. The occupancy each
kernel allows on an H100/H200 follows from its registers, threads and shared memory.

Only csrc/cuda/attention_kernels.cuh is compiled (it needs no torch headers): every kernel the
launchers use, one nvcc process per dtype, cached in a temporary folder by a hash of the sources.
Skipped only where nvcc is absent.

    python -m pytest -q tests/test_cuda_resources.py
    python tests/test_cuda_resources.py      # the table recorded in BENCHMARKS.md
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cuda"
EMU = ROOT / "tests" / "cuda_emu"
DTYPES = ("float", "__half", "__nv_bfloat16")
HEAD_DIMS = (16, 32, 48, 64, 128)
# The nvcc flags of setup.py that change code generation.
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]

# sm_90 (H100/H200) limits: registers per SM, register allocation unit per warp, warps, blocks,
# shared memory per SM and the 1 KB the system reserves per block, the per-block opt-in maximum.
SM90 = dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=233472, smem_reserved=1024,
            smem_block_max=232448)


def cuda_home():
    """The first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and torch's guess that has bin/nvcc."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        cands.append(CUDA_HOME)
    except Exception:
        pass
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return c
    return None


def nvcc():
    home = cuda_home()
    return str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")


def cuobjdump():
    """cuobjdump from the toolkit, PATH, or the copies torch's dependencies ship (triton, wheels)."""
    cands = [Path(cuda_home() or "/nonexistent") / "bin" / "cuobjdump", shutil.which("cuobjdump")]
    for mod, sub in (("triton", "backends/nvidia/bin/cuobjdump"), ("nvidia.cuda_cuobjdump", "bin/cuobjdump")):
        try:
            m = __import__(mod, fromlist=["__file__"])
            cands.append(Path(m.__file__).parent / sub)
        except Exception:
            pass
    for c in cands:
        if c and Path(c).exists():
            return str(c)
    return None


pytestmark = pytest.mark.skipif(nvcc() is None, reason="no nvcc (CUDA toolkit) on this machine")


def _cache():
    d = Path(tempfile.gettempdir()) / f"llama2_cuda_resources_{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _key(*parts):
    h = hashlib.sha256()
    for p in sorted(KERNELS.glob("*.cuh")):
        h.update(p.read_bytes())
    for part in parts:
        h.update(str(part).encode())
    return h.hexdigest()[:16]


def _compile(dtype):
    """nvcc -cubin -Xptxas -v of every attention kernel for one dtype -> (ptxas log, cubin path)."""
    out = _cache() / f"attn_{dtype}_{_key(dtype, NVCC_FLAGS, nvcc())}"
    log, cubin = out.with_suffix(".log"), out.with_suffix(".cubin")
    if log.exists() and cubin.exists():
        return log.read_text(), cubin
    inst = "\n".join(
        f"template __global__ void attention_fwd_kernel<{dtype}, {d}, fwd_warps<{dtype}>()>(const AttnParams);\n"
        f"template __global__ void attention_bwd_kernel<{dtype}, {d}, kBwdWarps>(const AttnParams);"
        for d in HEAD_DIMS)
    src = out.with_suffix(".cu")
    src.write_text('#include "attention_kernels.cuh"\nnamespace llama2 {\nnamespace cuda {\n' + inst +
                   f"\ntemplate __global__ void attention_delta_kernel<{dtype}>(const AttnParams, int);\n"
                   "}  // namespace cuda\n}  // namespace llama2\n")
    tmp = out.with_suffix(f".tmp{os.getpid()}.cubin")
    cmd = [nvcc(), "-arch=sm_90", "-cubin", *NVCC_FLAGS, "-Xptxas", "-v", f"-I{KERNELS}", str(src), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stderr[-5000:]}"
    os.replace(tmp, cubin)
    log.write_text(res.stdout + res.stderr)
    return log.read_text(), cubin


def _demangle(name):
    """('fwd'|'bwd'|'delta', dtype, D or None) of a mangled kernel name, e.g.
    _ZN6llama24cuda20attention_fwd_kernelI13__nv_bfloat16Li64ELi4EEEvNS0_10AttnParamsE."""
    m = re.search(r"attention_(fwd|bwd|delta)_kernelI(f|\d+)", name)
    kind, t = m.groups()
    if t == "f":
        dtype = "float"
    else:  # a length-prefixed type name
        start = m.end()
        dtype = name[start:start + int(t)]
    d = re.search(r"Li(\d+)E", name)
    return kind, dtype, int(d.group(1)) if d else None


def parse_ptxas(log):
    """{mangled name: {regs, spill_stores, spill_loads, stack, static_smem}} from ptxas -v."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {"static_smem": 0})
        elif cur is not None:
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                cur["regs"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            if m:
                cur["static_smem"] = int(m.group(1))
    return out


def hmma_counts(cubin):
    """{mangled name: number of HMMA instructions} from cuobjdump -sass."""
    tool = cuobjdump()
    assert tool, ("no cuobjdump: it ships with the CUDA toolkit, triton (a dependency of torch's "
                  "CUDA builds) and the nvidia-cuda-cuobjdump wheel")
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    counts, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            counts[cur] = 0
        elif cur and re.search(r"\bHMMA\b", line):
            counts[cur] += 1
    return counts


def layouts():
    """{(kind, dtype, D): (threads, dynamic shared memory bytes)} from the kernels' own layouts."""
    cxx = os.environ.get("CXX", "c++")
    exe = _cache() / f"layouts_{_key('layouts', cxx)}"
    if not exe.exists():
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        cmd = [cxx, "-std=c++20", "-O0", "-DLLAMA2_CUDA_EMULATION", f"-I{EMU}", f"-I{KERNELS}",
               str(EMU / "layouts.cpp"), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        os.replace(tmp, exe)
    out = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        kind, dtype, d, nt, nbytes = line.split()
        out[(kind, dtype, int(d))] = (int(nt), int(nbytes))
    return out


def occupancy(regs, threads, smem):
    """Blocks per SM and the share of the SM's 64 warps they keep busy, on sm_90."""
    warps = threads // 32
    per_warp = -(-regs * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = (SM90["regs"] // per_warp) // warps
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    by_threads = SM90["warps"] // warps
    blocks = min(by_regs, by_smem, by_threads, SM90["blocks"])
    return blocks, blocks * warps / SM90["warps"], ("regs" if blocks == by_regs else
                                                    "smem" if blocks == by_smem else "threads")


@pytest.fixture(scope="module")
def table():
    """One row per kernel: ptxas's numbers, HMMA count, threads and shared memory."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        compiled = dict(zip(DTYPES, pool.map(_compile, DTYPES)))
    return rows(compiled)


def rows(compiled):
    lay = layouts()
    table = []
    for dtype, (log, cubin) in compiled.items():
        hmma = hmma_counts(cubin)
        for name, info in parse_ptxas(log).items():
            kind, dt, d = _demangle(name)
            assert dt == dtype, (name, dt, dtype)
            threads, smem = lay.get((kind, dtype, d), (256, 0))
            smem += info["static_smem"]
            table.append(dict(name=name, kind=kind, dtype=dtype, D=d, threads=threads, smem=smem,
                              hmma=hmma.get(name, 0), **info))
    return sorted(table, key=lambda r: (r["kind"], DTYPES.index(r["dtype"]), r["D"] or 0))


def test_no_register_spills(table):
    assert len(table) == len(DTYPES) * (2 * len(HEAD_DIMS) + 1)
    spills = [f"{r['kind']} {r['dtype']} D={r['D']}: {r['spill_stores']} B stores, {r['spill_loads']} B loads"
              for r in table if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "local-memory spills in the attention kernels:\n" + "\n".join(spills)


def test_tensor_cores_where_wmma_is_used(table):
    for r in table:
        if r["kind"] == "delta":
            continue
        if r["dtype"] == "float":  # the FMA path
            assert r["hmma"] == 0, f"{r['kind']} float D={r['D']}: HMMA in the float32 kernel"
        else:
            assert r["hmma"] > 0, f"{r['kind']} {r['dtype']} D={r['D']}: no HMMA, WMMA did not reach the tensor cores"


def test_every_kernel_fits_an_sm(table):
    for r in table:
        assert r["regs"] <= 255
        assert r["smem"] <= SM90["smem_block_max"], f"{r['kind']} {r['dtype']} D={r['D']}: {r['smem']} B shared"
        blocks, _, _ = occupancy(r["regs"], r["threads"], r["smem"])
        assert blocks >= 1, f"{r['kind']} {r['dtype']} D={r['D']}: no block fits on an SM"


def markdown(table):
    lines = ["| kernel | dtype | D | threads | registers | shared memory | HMMA | spills | blocks/SM | occupancy (limit) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        blocks, occ, limit = occupancy(r["regs"], r["threads"], r["smem"])
        lines.append(f"| {r['kind']} | {r['dtype'].strip('_')} | {r['D'] or '-'} | {r['threads']} | {r['regs']} | "
                     f"{r['smem'] / 1024:.1f} KB | {r['hmma']} | {r['spill_stores'] + r['spill_loads']} B | "
                     f"{blocks} | {occ:.0%} ({limit}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    if nvcc() is None:
        sys.exit("no nvcc")
    with ThreadPoolExecutor(max_workers=3) as pool:
        res = dict(zip(DTYPES, pool.map(_compile, DTYPES)))
    print(markdown(rows(res)))
