"""Builds and drives tests/cuda_emu/runner.cpp: the real CUDA kernels run on the CPU (simt.h).

build(...) compiles the runner with the system C++ compiler (no CUDA toolkit, no torch headers)
into a cache folder named by a hash of the sources and flags, so a second test session reuses it.
run(...) writes the inputs as raw arrays into a temporary folder, runs the runner on one op and
reads the outputs back as torch tensors.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "tests" / "cuda_emu"
KERNELS = ROOT / "csrc" / "cuda"
KERNEL_HEADERS = ("device.cuh", "attention_kernels.cuh", "rms_norm_kernels.cuh", "rope_kernels.cuh")
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# ThreadSanitizer: report a race, then exit 66 (the test reads the report); setarch -R turns off
# address randomization, which some kernels' settings make TSan refuse.
TSAN_EXIT = 66
TSAN_OPTIONS = f"halt_on_error=1 exitcode={TSAN_EXIT} report_signal_unsafe=0 history_size=4"


class EmulatorError(RuntimeError):
    """The runner failed: a race (ThreadSanitizer), a deadlock, a device assertion, a WMMA rule."""

    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr
        super().__init__(f"emulated kernel failed (exit {returncode}):\n{stderr[-4000:]}")


def compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) to build the CUDA emulation")
    return cxx


def cache_dir() -> Path:
    d = Path(os.environ.get("LLAMA2_EMU_CACHE", Path(tempfile.gettempdir()) / f"llama2_cuda_emu_{os.getuid()}"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(tsan: bool = False, head_dims=(16, 32, 48, 64, 128), dtypes=("f32", "f16", "bf16"),
          kernel_dir: Path = KERNELS, tag: str = "") -> Path:
    """The runner binary, compiled if the cache has none for these sources and flags."""
    dims = " ".join(f"X({d})" for d in head_dims)
    types = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}
    dts = " ".join(f"X({n}, {types[n]})" for n in dtypes)
    flags = ["-std=c++20", "-O1", "-g", "-fno-strict-aliasing", "-pthread", "-DLLAMA2_CUDA_EMULATION",
             f"-DLLAMA2_EMU_HEAD_DIMS(X)={dims}", f"-DLLAMA2_EMU_DTYPES(X)={dts}",
             f"-I{EMU}", f"-I{kernel_dir}"]
    if tsan:
        flags.append("-fsanitize=thread")
    h = hashlib.sha256(" ".join([compiler()] + flags).encode())
    for p in [EMU / "simt.h", EMU / "runner.cpp"] + [Path(kernel_dir) / n for n in KERNEL_HEADERS]:
        h.update(p.read_bytes())
    out = cache_dir() / f"runner{tag}{'_tsan' if tsan else ''}_{h.hexdigest()[:16]}"
    if out.exists():
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = [compiler(), *flags, str(EMU / "runner.cpp"), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    os.replace(tmp, out)
    return out


_SETARCH = None


def _prefix(tsan: bool) -> list:
    """setarch -R (no address randomization) for ThreadSanitizer, where it is allowed."""
    global _SETARCH
    if not tsan:
        return []
    if _SETARCH is None:
        cmd = ["setarch", os.uname().machine, "-R"]
        ok = shutil.which("setarch") and subprocess.run(cmd + ["true"], capture_output=True).returncode == 0
        _SETARCH = cmd if ok else []
    return _SETARCH


def write_tensor(path: Path, t: torch.Tensor) -> None:
    t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tofile(path)


def read_tensor(path: Path, shape, dtype) -> torch.Tensor:
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    return raw.view(dtype).reshape(shape)


def is_tsan(binary: Path) -> bool:
    return "_tsan_" in Path(binary).name


def run(binary: Path, op: str, dtype: torch.dtype, inputs: dict, outputs: dict, timeout: float = 300,
        **keys) -> dict:
    """Runs one op. inputs: name -> tensor; outputs: name -> (shape, dtype). Raises EmulatorError."""
    tsan = is_tsan(binary)
    with tempfile.TemporaryDirectory(prefix="llama2_emu_") as d:
        d = Path(d)
        for name, t in inputs.items():
            write_tensor(d / f"{name}.bin", t)
        args = [str(binary), op, f"dir={d}", f"dtype={DTYPE_NAMES[dtype]}"]
        args += [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in keys.items()]
        env = dict(os.environ, TSAN_OPTIONS=TSAN_OPTIONS)
        res = subprocess.run(_prefix(tsan) + args, capture_output=True, text=True, env=env,
                             timeout=timeout)
        if res.returncode != 0 or "ThreadSanitizer" in res.stderr:
            raise EmulatorError(res.returncode, res.stderr)
        return {name: read_tensor(d / f"{name}.bin", shape, dt) for name, (shape, dt) in outputs.items()}
