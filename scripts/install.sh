#!/usr/bin/env bash
# Installs marginkit for development on a fresh machine or an existing one.
# Keeps an existing torch; where there is none, takes torch 2.13.0 (the CPU build that
# lies on disk on our machines; elsewhere pip fetches it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "marginkit: no torch found, installing torch==2.13.0"
  "$PYTHON" -m pip install -q torch==2.13.0
fi
# Build tools first: the editable install below builds marginkit._C against them.
"$PYTHON" -m pip install -q "setuptools>=64" wheel "pybind11>=2.12" ninja
if ! command -v cmake >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q "cmake>=3.24"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MARGINKIT_BUILD_DIR=${MARGINKIT_BUILD_DIR:-$PWD/build/cmake}
"$PYTHON" -m pip install -q --no-build-isolation -e ".[test]"
"$PYTHON" -c "import marginkit, marginkit._C as C; print('marginkit', marginkit.__version__, 'built with', C.build_info())"
