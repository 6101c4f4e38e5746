"""Builds the llama2 package and its compiled extension, llama2_C.

    pip install --no-build-isolation -e .

The CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels (csrc/cuda/*.cu)
are added whenever torch is a CUDA build and nvcc is found (CUDA_HOME, e.g. /usr/local/cuda);
TORCH_CUDA_ARCH_LIST narrows the GPU architectures (CI uses 9.0). LLAMA2_NO_CUDA=1 skips them.
Without the extension, llama2.py runs its plain PyTorch reference path.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    if os.environ.get("LLAMA2_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def compiler_accepts(flag):
    """Whether the C++ compiler takes `flag`: Apple's clang has no -fopenmp, and not every compiler
    knows -march=native. A flag it refuses is left out (without OpenMP the CPU kernels run on one
    thread) rather than failing the build."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [os.environ.get("CXX", "c++"), flag, "-c", src, "-o", os.path.join(d, "probe.o")]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


def extension():
    if want_cuda() and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: compile for Hopper (H100/H200) only rather than for every architecture.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20"]  # torch >= 2.10 headers need C++20
    openmp = ["-fopenmp"] if compiler_accepts("-fopenmp") else []  # at::parallel_for's threads
    cxx += openmp
    if os.environ.get("LLAMA2_PORTABLE") != "1" and compiler_accepts("-march=native"):
        cxx.append("-march=native")  # the machine that builds is the machine that runs (pip install -e)
    cuda_sources = rel("csrc/cuda/*.cu")
    if want_cuda() and cuda_sources:
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
        return CUDAExtension("llama2_C", sources + cuda_sources,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=openmp)
    return CppExtension("llama2_C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)


setup(
    name="llama2",
    version="0.1.0",
    description="The whole Llama 2 recipe, readable: model, kernels, pretraining, SFT, GAtt, RM, RLHF",
    py_modules=[m for m in ("llama2", "llama2_kernels", "training", "world")
                if os.path.exists(os.path.join(HERE, m + ".py"))],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
