// Self-registration of op bindings: each csrc/ops/<op>.cpp defines its binding with MK_BIND_OP,
// which adds it to this list at load time, so adding an op edits no central file. module.cpp
// runs every registered binding when Python imports marginkit._C.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

namespace mk {

// Where an op binds its entries: cpu always; cuda only when built with CUDA (else nullptr).
struct BindTarget {
  pybind11::module_& cpu;
  pybind11::module_* cuda;
};

using BindFn = void (*)(BindTarget&);

inline std::vector<BindFn>& op_bindings() {
  static std::vector<BindFn> fns;
  return fns;
}

struct RegisterBinding {
  explicit RegisterBinding(BindFn fn) { op_bindings().push_back(fn); }
};

// The GIL is released around every kernel call: they touch no Python object.
using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;

}  // namespace mk

#define MK_BIND_OP(op)                                                    \
  static void mk_bind_##op(::mk::BindTarget& target);                     \
  static const ::mk::RegisterBinding mk_register_##op(&mk_bind_##op);     \
  static void mk_bind_##op(::mk::BindTarget& target)
