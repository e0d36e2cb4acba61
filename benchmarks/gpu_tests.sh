#!/usr/bin/env bash
# The GPU correctness checks still owed by CPU-only sessions, in one call on a GPU machine:
# build marginkit (CUDA kernels of marginkit._C included), then every test marked `gpu`
# (Triton kernels on CUDA vs the float64 reference and the textbook bf16 error, C = 4M;
# each csrc CUDA op vs its CPU twin incl. C = 1M, B = 8192; NCCL world size 1 vs one GPU).
#
#   bash benchmarks/gpu_tests.sh OUTDIR      # writes OUTDIR/build.log, gpu-tests.log, gpu-tests.xml
#
# Budget: build <= 150 s, tests <= 420 s. Run benchmarks/gpu_run.sh (the sweep) in a second call.
set -uo pipefail
OUTDIR=${1:?usage: bash benchmarks/gpu_tests.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUTDIR/build.log"
if ! timeout 150 $PY -m pip install --no-build-isolation --no-deps -e . >> "$OUTDIR/build.log" 2>&1; then
  echo "build FAILED or timed out; tail of build.log:"; tail -n 30 "$OUTDIR/build.log"; exit 1
fi
$PY -c "import marginkit._C as C; print(C.build_info())" 2>&1 | tee -a "$OUTDIR/build.log"

set -o pipefail
timeout 420 $PY -m pytest -m gpu -q -rs --durations=15 -p no:cacheprovider tests \
  --junitxml "$OUTDIR/gpu-tests.xml" 2>&1 | tee "$OUTDIR/gpu-tests.log"
echo "gpu tests rc=$? (0 ok, 1 failures, 124 timed out)"
