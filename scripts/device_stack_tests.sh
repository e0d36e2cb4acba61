#!/usr/bin/env bash
# The CPU test suite under the GPU machine's software stack, on a machine without a GPU:
# Python 3.12, torch 2.11 (its CUDA 13 wheel from PyPI, ~3 GB with its nvidia-* wheels),
# Triton 3.6, numpy < 2.4 (Triton 3.6's interpreter turns 1-element arrays into ints, which
# numpy 2.4 refuses). Catches what would otherwise first fail in the GPU call's scarce minutes:
# an API torch 2.11 or Triton 3.6 lacks, the C++/CUDA build against torch 2.11's headers, and
# the stubbed host-cost guards on Triton 3.6's launcher. Not run by CI (the download).
#
# Usage: bash scripts/device_stack_tests.sh [pytest args...]   (default: tests -n 2)
# It tests the committed HEAD, in a clone (the editable build of this checkout is untouched).
# VENV (default /tmp/marginkit-device-stack) is kept between runs; PY312 names a Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
VENV=${VENV:-/tmp/marginkit-device-stack}
CLONE=${CLONE:-/tmp/marginkit-device-stack-clone}

if ! command -v "$PY312" >/dev/null 2>&1; then
  echo "device_stack_tests: no Python 3.12 ($PY312); set PY312 to one" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest-xdist
"$VENV/bin/python" -c "import torch, triton, numpy; print('stack: torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"

rm -rf "$CLONE"
git clone -q . "$CLONE"
cd "$CLONE"
PYTHON="$VENV/bin/python" bash scripts/install.sh
if [ $# -eq 0 ]; then
  set -- tests -n 2
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
