// marginkit._C: pybind11 bindings. Tensors cross as integers (data_ptr()),
// sizes, dtype codes (mk::DType) and a CUDA stream handle. See marginkit/backends/cuda.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common.h"
#include "ops.h"

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
            "Low-level: use marginkit.backends.cuda, which validates tensors.";
  m.def("build_info", &build_info,
        "dict: cuda (bool), archs, cuda_version, cuda_compiler, cudart, compiler, cxx_standard, pybind11, build_type");
  using namespace pybind11::literals;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  py::module_ cpu = m.def_submodule("cpu", "CPU kernels (raw pointers)");
  cpu.def("class_center_update", &mk::cpu::class_center_update, nogil, "centers"_a, "C"_a, "D"_a,
          "emb"_a, "emb_dtype"_a, "B"_a, "sorted_labels"_a, "order"_a, "momentum"_a, "ignore_index"_a);
  cpu.def("class_statistics_update", &mk::cpu::class_statistics_update, nogil, "counts"_a,
          "cos_sum"_a, "sq_sum"_a, "C"_a, "emb"_a, "emb_dtype"_a, "weight"_a, "w_dtype"_a, "B"_a,
          "D"_a, "sorted_labels"_a, "order"_a, "ignore_index"_a);
  cpu.def("range_loss_forward", &mk::cpu::range_loss_forward, nogil, "emb"_a, "dtype"_a, "B"_a, "D"_a,
          "sorted_labels"_a, "order"_a, "k2"_a, "margin"_a, "alpha"_a, "beta"_a, "loss"_a,
          "row_seg"_a, "sel_pairs"_a, "sel_coef"_a, "closest"_a, "inter_vec"_a);
  cpu.def("range_loss_backward", &mk::cpu::range_loss_backward, nogil, "grad_loss"_a, "emb"_a,
          "dtype"_a, "B"_a, "D"_a, "k2"_a, "row_seg"_a, "sel_pairs"_a, "sel_coef"_a, "closest"_a,
          "inter_vec"_a, "grad_emb"_a);
  cpu.def("partial_fc_mark", &mk::cpu::partial_fc_mark, nogil, "labels"_a, "B"_a, "start"_a,
          "stop"_a, "flags"_a);
  cpu.def("partial_fc_select", &mk::cpu::partial_fc_select, nogil, "flags"_a, "start"_a, "stop"_a,
          "seed"_a, "m"_a, "labels"_a, "B"_a, "index"_a, "local_labels"_a);
  cpu.def("sparse_sgd_step", &mk::cpu::sparse_sgd_step, nogil, "weight"_a, "grad"_a,
          "momentum_buffer"_a, "initialized"_a, "rows"_a, "R"_a, "D"_a, "dtype"_a, "lr"_a,
          "momentum"_a, "weight_decay"_a, "dampening"_a, "nesterov"_a);
  cpu.def("sparse_adamw_step", &mk::cpu::sparse_adamw_step, nogil, "weight"_a, "grad"_a,
          "exp_avg"_a, "exp_avg_sq"_a, "step"_a, "rows"_a, "R"_a, "D"_a, "dtype"_a, "lr"_a,
          "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a);

#ifdef MARGINKIT_WITH_CUDA
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels (raw device pointers + stream handle)");
  cuda.def("runtime_version", &mk::cuda::runtime_version);
  cuda.def("driver_version", &mk::cuda::driver_version, "0 when no driver is installed");
  cuda.def("device_count", &mk::cuda::device_count, "0 when no driver/GPU");
  cuda.def("class_center_update_workspace_bytes", &mk::cuda::class_center_update_workspace_bytes);
  cuda.def("class_center_update", &mk::cuda::class_center_update, nogil, "centers"_a, "C"_a, "D"_a,
           "emb"_a, "emb_dtype"_a, "B"_a, "sorted_labels"_a, "order"_a, "momentum"_a,
           "ignore_index"_a, "workspace"_a, "device"_a, "stream"_a);
  cuda.def("class_statistics_update_workspace_bytes", &mk::cuda::class_statistics_update_workspace_bytes);
  cuda.def("class_statistics_update", &mk::cuda::class_statistics_update, nogil, "counts"_a,
           "cos_sum"_a, "sq_sum"_a, "C"_a, "emb"_a, "emb_dtype"_a, "weight"_a, "w_dtype"_a, "B"_a,
           "D"_a, "sorted_labels"_a, "order"_a, "ignore_index"_a, "workspace"_a, "device"_a, "stream"_a);
  cuda.def("range_loss_workspace_bytes", &mk::cuda::range_loss_workspace_bytes);
  cuda.def("range_loss_max_k", &mk::cuda::range_loss_max_k);
  cuda.def("range_loss_forward", &mk::cuda::range_loss_forward, nogil, "emb"_a, "dtype"_a, "B"_a,
           "D"_a, "sorted_labels"_a, "order"_a, "k2"_a, "margin"_a, "alpha"_a, "beta"_a, "loss"_a,
           "row_seg"_a, "sel_pairs"_a, "sel_coef"_a, "closest"_a, "inter_vec"_a, "workspace"_a,
           "device"_a, "stream"_a);
  cuda.def("range_loss_backward", &mk::cuda::range_loss_backward, nogil, "grad_loss"_a, "emb"_a,
           "dtype"_a, "B"_a, "D"_a, "k2"_a, "row_seg"_a, "sel_pairs"_a, "sel_coef"_a, "closest"_a,
           "inter_vec"_a, "grad_emb"_a, "device"_a, "stream"_a);
  cuda.def("partial_fc_workspace_bytes", &mk::cuda::partial_fc_workspace_bytes);
  cuda.def("partial_fc_mark", &mk::cuda::partial_fc_mark, nogil, "labels"_a, "B"_a, "start"_a,
           "stop"_a, "flags"_a, "workspace"_a, "device"_a, "stream"_a);
  cuda.def("partial_fc_select", &mk::cuda::partial_fc_select, nogil, "flags"_a, "start"_a, "stop"_a,
           "seed"_a, "m"_a, "labels"_a, "B"_a, "index"_a, "local_labels"_a, "workspace"_a,
           "device"_a, "stream"_a);
  cuda.def("sparse_sgd_step", &mk::cuda::sparse_sgd_step, nogil, "weight"_a, "grad"_a,
           "momentum_buffer"_a, "initialized"_a, "rows"_a, "R"_a, "D"_a, "dtype"_a, "lr"_a,
           "momentum"_a, "weight_decay"_a, "dampening"_a, "nesterov"_a, "device"_a, "stream"_a);
  cuda.def("sparse_adamw_step", &mk::cuda::sparse_adamw_step, nogil, "weight"_a, "grad"_a,
           "exp_avg"_a, "exp_avg_sq"_a, "step"_a, "rows"_a, "R"_a, "D"_a, "dtype"_a, "lr"_a,
           "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a, "device"_a, "stream"_a);
#endif
}
