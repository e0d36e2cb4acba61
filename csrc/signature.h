// An op's parameter list is written once, as an X-macro LIST(X) of X(type, name) entries;
// these macros expand it into C++ parameter declarations and pybind11 argument names, so the
// CPU declaration, the CUDA declaration, both definitions and both bindings cannot drift apart.
//
//   #define MK_FOO_ARGS(X) X(ptr_t, out) X(int64_t, n)
//   void foo(MK_PARAMS(MK_FOO_ARGS));                         // void foo(ptr_t out, int64_t n)
//   m.def("foo", &foo, MK_PYARGS(MK_FOO_ARGS));               // py::arg("out"), py::arg("n")
#pragma once

#include <cstdint>

namespace mk {
using ptr_t = std::uintptr_t;  // a tensor's data_ptr(), as a Python int
}  // namespace mk

// Each entry expands to ", <item>"; MK_DROP_FIRST_ removes the leading comma.
#define MK_DROP_FIRST(first, ...) __VA_ARGS__
#define MK_DROP_FIRST_(...) MK_DROP_FIRST(__VA_ARGS__)
#define MK_PARAM_ITEM(type, name) , type name
#define MK_PYARG_ITEM(type, name) , pybind11::arg(#name)

#define MK_PARAMS(LIST) MK_DROP_FIRST_(LIST(MK_PARAM_ITEM))
#define MK_PYARGS(LIST) MK_DROP_FIRST_(LIST(MK_PYARG_ITEM))

// What every CUDA entry takes after the op's own parameters: a scratch buffer of
// <op>_workspace_bytes(...) bytes (0 where the op needs none), the device index and a cudaStream_t.
#define MK_CUDA_LAUNCH_ARGS(X) X(ptr_t, workspace) X(int, device) X(ptr_t, stream)
