#!/usr/bin/env bash
# Download the peers' wheels into .whl/ (git-ignored) for benchmarks/gpu_run.sh: the GPU machine
# has no network and its image lacks these three. Pure-Python wheels; their needs (torch, triton,
# numpy, scikit-learn, tqdm) are in the GPU image. Pass it to the device run with carry: [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl \
  "cut-cross-entropy==25.1.1" "liger-kernel==0.8.5" "pytorch-metric-learning==2.9.0"
ls -l .whl
