"""A measuring instrument: run marginkit's CUDA code path on a CPU-only machine.

``stub_libcuda.c`` is a ``libcuda.so.1`` whose every driver call succeeds at once (attributes
of an H100/H200). With it first on ``LD_LIBRARY_PATH``, Triton's real CUDA host path runs
(binder, specialisation, kernel cache, C launcher; kernels really compiled for sm_90 by
ptxas) while no kernel ever executes. ``probe.py`` is the child process that runs a training
step that way and counts what the host does; ``build_stub`` and ``run_probe`` drive it from
the tests (tests/backends/test_host_cost.py) and the benchmark (benchmarks/host_cost.py).
Numbers the probe reports are counts of host work; kernel outputs are garbage by design.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["STUB_SOURCE", "PROBE", "cuda_headers", "build_stub", "run_probe"]

HERE = Path(__file__).resolve().parent
STUB_SOURCE = HERE / "stub_libcuda.c"
PROBE = HERE / "probe.py"
REPO = HERE.parent.parent


def cuda_headers() -> Optional[Path]:
    """Triton's bundled CUDA headers (the ``cuda.h`` its driver.c is compiled against), or None."""
    try:
        import triton
    except ImportError:
        return None
    include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    return include if (include / "cuda.h").is_file() else None


def build_stub(out_dir: Path) -> tuple[Optional[Path], str]:
    """Compile the stub into ``out_dir``/libcuda.so.1: (the folder holding it, "") or (None, why not)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None, "gcc is not installed"
    include = cuda_headers()
    if include is None:
        return None, "Triton's CUDA backend headers (triton/backends/nvidia/include/cuda.h) are absent"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [gcc, "-shared", "-fPIC", "-O2", "-I", str(include), str(STUB_SOURCE), "-o", str(out_dir / "libcuda.so.1")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # a broken build is a failure of the instrument, not a reason to skip
        raise RuntimeError(f"building the stub libcuda failed: {' '.join(cmd)}\n{done.stderr}")
    return out_dir, ""


def probe_env(stub_dir: Path) -> dict:
    """The child's environment: the stub first on the loader path, no interpreter, no visible GPU for torch."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(stub_dir) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["TRITON_LIBCUDA_PATH"] = str(stub_dir)  # Triton links its launcher against this libcuda
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CUDA build of torch must not take the stub for a GPU
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_probe(stub_dir: Path, args: list[str], timeout: float = 900.0) -> list[dict]:
    """Run probe.py with ``args`` under the stub; its JSON rows (one per class count)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        done = subprocess.run(
            [sys.executable, str(PROBE), "--json", str(out), *args],
            env=probe_env(stub_dir), capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
        )
        if done.returncode != 0:
            raise RuntimeError(f"probe.py {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return json.loads(out.read_text())
