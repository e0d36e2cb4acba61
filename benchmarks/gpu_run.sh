#!/usr/bin/env bash
# Prepared run for a GPU machine (one H100/H200): install carried wheels, build marginkit,
# a correctness smoke test, then the full benchmark sweep.
#
#   bash benchmarks/gpu_run.sh OUTDIR
#
# Writes into OUTDIR (8 files at most):
#   <gpu-slug>-<date>.csv   rows in API.md's schema (written row by row: a cut-short sweep keeps its rows)
#   <gpu-slug>-<date>.png   time and peak extra memory against C (redrawn from the CSV if the sweep was cut)
#   <gpu-slug>-<date>.json  versions, timer, first-call/compile times, notes, OOM/error details
#   build.log smoke.log bench.log  (and env.log)
# Every phase is time-boxed so that the whole script ends in about 9 minutes at worst on an H100
# (typically 4 to 6): wheels ~10 s, build <= 150 s, smoke test <= 75 s, sweep <= 270 s + the run in flight
# (hard stop at 330 s).
# Peers that are not in the image travel as wheels in .whl/ (benchmarks/fetch_wheels.sh makes them).
# Knobs: MK_SKIP_BUILD=1 (use the tree as it is), MK_BENCH_ARGS (default "--device cuda"), PYTHON.
set -uo pipefail

OUTDIR=${1:?usage: bash benchmarks/gpu_run.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
phase() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

phase "environment" | tee "$OUTDIR/env.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$OUTDIR/env.log"

# 1. wheels carried in .whl/ (cut-cross-entropy, liger-kernel, pytorch-metric-learning)
if compgen -G ".whl/*.whl" > /dev/null; then
  phase "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
       >> "$OUTDIR/env.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "wheel install failed (see env.log); peers without a package will be skipped"
  fi
else
  phase "no .whl/ folder: peers that are not installed will be skipped"
fi

# 2. build marginkit (CMake builds marginkit._C with the CUDA kernels)
phase "building marginkit"
if [ -n "${MK_SKIP_BUILD:-}" ]; then
  echo "MK_SKIP_BUILD set: using the source tree as it is" | tee "$OUTDIR/build.log"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
elif timeout 150 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUTDIR/build.log" 2>&1; then
  echo "build ok"
else
  echo "build FAILED or timed out (rc=$?); tail of build.log:"; tail -n 25 "$OUTDIR/build.log"
  echo "falling back to the source tree on PYTHONPATH (no compiled marginkit._C)"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import marginkit, sys; print('marginkit from', marginkit.__file__)" 2>&1 | tee -a "$OUTDIR/build.log"

# 3. correctness smoke test on the GPU
phase "smoke test: pytest -x -q tests -k 'gpu or cuda'"
timeout 75 $PY -m pytest -x -q -p no:cacheprovider tests -k "gpu or cuda" > "$OUTDIR/smoke.log" 2>&1
SMOKE=$?
tail -n 15 "$OUTDIR/smoke.log"
[ $SMOKE -eq 0 ] || echo "smoke test rc=$SMOKE (124 = timed out; 5 = no test selected); the sweep runs anyway"

# 4. the sweep: defaults for CUDA (B=1024, D=512, bf16, arcface, C = 100K, 1M, 4M, 10M, every provider)
phase "benchmark sweep"
# MK_BENCH_ARGS replaces "--device cuda" (e.g. "--device cuda --C 1M" for a shorter run)
# --time-limit-s: no new run starts after 270 s, so the sweep ends by itself (table, JSON, plot) before the
# hard timeout; the C values run in ascending order, so C = 100K and 1M come first.
timeout 330 $PY -m marginkit bench ${MK_BENCH_ARGS:---device cuda} --time-limit-s 270 --out-dir "$OUTDIR" --no-progress 2>&1 \
  | tee "$OUTDIR/bench.log"
BENCH=${PIPESTATUS[0]}
CSV=$(ls -t "$OUTDIR"/*.csv 2>/dev/null | head -n 1)
if [ -n "$CSV" ] && [ ! -f "${CSV%.csv}.png" ]; then
  echo "sweep ended early (rc=$BENCH): drawing the plot from the rows written"
  $PY -m marginkit.bench.plot "$CSV" 2>&1 | tee -a "$OUTDIR/bench.log"
fi
rm -f "$OUTDIR"/*.tmp
phase "done: bench rc=$BENCH (0 ok, 3 = some providers raised, 124 = timed out), smoke rc=$SMOKE"
ls -l "$OUTDIR"
