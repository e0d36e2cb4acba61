"""What marginkit._C was built with, and that the package layout imports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

_C = pytest.importorskip("marginkit._C")


def test_build_info_fields():
    info = _C.build_info()
    for key in ("cuda", "archs", "cuda_version", "compiler", "pybind11", "build_type"):
        assert key in info, key
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["archs"], list)
    assert info["pybind11"].count(".") == 2
    assert info["build_type"]
    if info["cuda"]:
        assert {"sm_80", "sm_90a"} <= set(info["archs"])
        assert info["cuda_version"].split(".")[0].isdigit()
        assert hasattr(_C, "cuda")
    else:
        assert info["archs"] == [] and not hasattr(_C, "cuda")


def _nvcc_on_path():
    return shutil.which("nvcc") is not None


@pytest.mark.skipif(not _nvcc_on_path() or os.environ.get("MARGINKIT_NO_CUDA", "") not in ("", "0"),
                    reason="needs nvcc on PATH and MARGINKIT_NO_CUDA unset")
def test_cuda_code_is_built_when_nvcc_is_present():
    # A machine that can compile CUDA must not end up with a CPU-only module.
    assert _C.build_info()["cuda"] is True


def test_cuda_runtime_queries_work_without_a_gpu():
    if not _C.build_info()["cuda"]:
        pytest.skip("built without CUDA")
    # static cudart: importing and querying must work with or without a driver
    assert _C.cuda.runtime_version() >= 12000
    assert _C.cuda.device_count() == torch.cuda.device_count()


def test_triton_kernels_is_installed_as_a_subpackage():
    import marginkit.triton_kernels as tk

    assert tk.__name__ == "marginkit.triton_kernels"
    assert Path(tk.__file__).parent.name == "triton_kernels"
