"""Build script for marginkit.

The only compiled piece is ``marginkit._C``: one pybind11 module built by CMake
(Ninja) from ``csrc/`` (C++17 always; CUDA whenever nvcc is found). Everything
else is pure Python.

Environment switches:
  MARGINKIT_NO_CUDA=1        build the CPU kernels only, on purpose.
  MARGINKIT_CUDA_ARCHS=...   CMake CUDA architectures (default "80;90a-real":
                             sm_80 SASS + PTX, sm_90a SASS).
  MARGINKIT_BUILD_TYPE=...   CMake build type (default Release).
  MARGINKIT_BUILD_DIR=...    persistent CMake build directory (faster rebuilds).
  MAX_JOBS / CMAKE_BUILD_PARALLEL_LEVEL
                             parallel compile jobs (default: CPU count).
  CUDACXX / CUDA_HOME        where to look for nvcc.

If nvcc is found and the CUDA code fails to compile, the build fails: there is
no silent fall-back to a CPU-only module.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def find_nvcc():
    """Path of nvcc, or None. Same places CMake's CUDA detection looks first."""
    cand = os.environ.get("CUDACXX")
    if cand and Path(cand).is_file():
        return str(Path(cand).resolve())
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir):
        super().__init__(name, sources=[])
        self.sourcedir = str(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("marginkit needs CMake >= 3.24 to build (pip install cmake)")

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("MARGINKIT_BUILD_DIR") or Path(self.build_temp) / "cmake")
        build_dir = build_dir.resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("MARGINKIT_BUILD_TYPE") or ("Debug" if self.debug else "Release")

        args = [
            f"-DMARGINKIT_OUTPUT_DIR={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass  # CMakeLists.txt asks `python -m pybind11 --cmakedir` and explains.

        if _truthy("MARGINKIT_NO_CUDA"):
            args.append("-DMARGINKIT_CUDA=OFF")
            print("marginkit: MARGINKIT_NO_CUDA set, building CPU kernels only", flush=True)
        else:
            nvcc = find_nvcc()
            if nvcc:
                # ON = required: a broken toolkit fails the install.
                args += ["-DMARGINKIT_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
                print(f"marginkit: building CUDA kernels with {nvcc}", flush=True)
            else:
                args.append("-DMARGINKIT_CUDA=OFF")
                print("marginkit: nvcc not found, building CPU kernels only", flush=True)
        if os.environ.get("MARGINKIT_CUDA_ARCHS"):
            args.append(f"-DMARGINKIT_CUDA_ARCHS={os.environ['MARGINKIT_CUDA_ARCHS']}")

        cache = build_dir / "CMakeCache.txt"
        if not cache.exists():
            gen = ["-G", "Ninja"] if shutil.which("ninja") or _has_ninja_module() else []
            if gen and not shutil.which("ninja"):
                import ninja  # noqa: F401  (pip's ninja puts the binary next to it)

                args.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
            args = gen + args

        jobs = os.environ.get("MAX_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(_cpu_count())
        subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args], check=True)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", build_type, "--parallel", jobs], check=True
        )


def _has_ninja_module():
    try:
        import ninja  # noqa: F401

        return True
    except ImportError:
        return False


def _packages():
    pkgs = find_packages(include=["marginkit", "marginkit.*"])
    kernels = ROOT / "triton_kernels"
    if (kernels / "__init__.py").exists():
        pkgs.append("marginkit.triton_kernels")
        pkgs += [
            "marginkit.triton_kernels." + p
            for p in find_packages(where=str(kernels))
        ]
    return pkgs


setup(
    name="marginkit",
    version="0.1.0",
    description="Fused GPU kernels for large-class margin softmax losses (ArcFace, CosFace, ...)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"marginkit.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("marginkit._C", sourcedir=ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # A range the preinstalled CPU wheel (e.g. torch==2.13.0+cpu) satisfies, so pip
        # never re-resolves torch to a CUDA build.
        "torch>=2.4",
        "numpy",
        "tqdm",
        "matplotlib",
        "triton; platform_system=='Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytorch-metric-learning"],
        "bench": ["pytest-benchmark", "pytorch-metric-learning", "cut-cross-entropy", "liger-kernel"],
    },
    entry_points={"console_scripts": ["marginkit = marginkit.cli:main"]},
    zip_safe=False,
)
