// marginkit._C: the module. Each op binds itself (csrc/ops/<op>.cpp, registry.h); this file adds
// build_info and the CUDA runtime queries. Tensors cross as integers (data_ptr()), sizes, dtype
// codes (mk::DType) and a CUDA stream handle; marginkit/ops/ is the validating Python side.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common.h"
#include "registry.h"
#ifdef MARGINKIT_WITH_CUDA
#include "cuda/runtime.h"
#endif

namespace py = pybind11;

#ifndef MARGINKIT_BUILD_TYPE
#define MARGINKIT_BUILD_TYPE "unknown"
#endif
#ifndef MARGINKIT_CXX_COMPILER
#define MARGINKIT_CXX_COMPILER "unknown"
#endif

#define MK_STR2(x) #x
#define MK_STR(x) MK_STR2(x)

#ifdef MARGINKIT_WITH_CUDA
static std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ',') { if (!cur.empty()) out.push_back(cur); cur.clear(); }
    else cur += c;
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

#endif

static py::dict build_info() {
  py::dict d;
#ifdef MARGINKIT_WITH_CUDA
  d["cuda"] = true;
  {
    // CMake spelling ("80", "90a-real") -> "sm_80", "sm_90a"; PTX kept for non "-real" entries.
    std::vector<std::string> archs, ptx;
    for (const std::string& a : split_csv(MARGINKIT_CUDA_ARCHS)) {
      const auto dash = a.find('-');
      const std::string num = a.substr(0, dash);
      const std::string suffix = dash == std::string::npos ? "" : a.substr(dash + 1);
      if (suffix != "virtual") archs.push_back("sm_" + num);
      if (suffix != "real") ptx.push_back("compute_" + num);
    }
    d["archs"] = archs;
    d["ptx"] = ptx;
    d["cuda_architectures"] = std::string(MARGINKIT_CUDA_ARCHS);
  }
  d["cuda_version"] = std::string(MARGINKIT_CUDA_VERSION);
  d["cuda_compiler"] = std::string(MARGINKIT_CUDA_COMPILER);
  d["cudart"] = std::string("static");
#else
  d["cuda"] = false;
  d["archs"] = std::vector<std::string>{};
  d["ptx"] = std::vector<std::string>{};
  d["cuda_architectures"] = py::none();
  d["cuda_version"] = py::none();
  d["cuda_compiler"] = py::none();
  d["cudart"] = py::none();
#endif
  d["compiler"] = std::string(MARGINKIT_CXX_COMPILER);
  d["cxx_standard"] = (long)__cplusplus;
  d["pybind11"] = std::string(MK_STR(PYBIND11_VERSION_MAJOR) "." MK_STR(PYBIND11_VERSION_MINOR) "." MK_STR(PYBIND11_VERSION_PATCH));
  d["build_type"] = std::string(MARGINKIT_BUILD_TYPE);
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "marginkit compiled kernels (C++17 CPU always; CUDA when built with nvcc). "
            "Low-level, raw pointers: use marginkit.ops, which validates tensors.";
  m.def("build_info", &build_info,
        "dict: cuda (bool), archs, cuda_version, cuda_compiler, cudart, compiler, cxx_standard, pybind11, build_type");
  py::module_ cpu = m.def_submodule("cpu", "CPU kernels (raw pointers)");
  py::module_* cuda_ptr = nullptr;
#ifdef MARGINKIT_WITH_CUDA
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels (raw device pointers + stream handle)");
  cuda.def("runtime_version", &mk::cuda::runtime_version);
  cuda.def("driver_version", &mk::cuda::driver_version, "0 when no driver is installed");
  cuda.def("device_count", &mk::cuda::device_count, "0 when no driver/GPU");
  cuda_ptr = &cuda;
#endif
  mk::BindTarget target{cpu, cuda_ptr};
  for (mk::BindFn bind : mk::op_bindings()) bind(target);
}
