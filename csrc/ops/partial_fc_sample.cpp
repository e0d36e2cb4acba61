// Python bindings of partial_fc_sample (self-registered; see registry.h).
#include "ops/partial_fc_sample.h"
#include "registry.h"

MK_BIND_OP(partial_fc_sample) {
  target.cpu.def("partial_fc_mark", &mk::cpu::partial_fc_mark, mk::nogil(), MK_PYARGS(MK_PARTIAL_FC_MARK_ARGS));
  target.cpu.def("partial_fc_select", &mk::cpu::partial_fc_select, mk::nogil(),
                 MK_PYARGS(MK_PARTIAL_FC_SELECT_ARGS));
#ifdef MARGINKIT_WITH_CUDA
  target.cuda->def("partial_fc_workspace_bytes", &mk::cuda::partial_fc_workspace_bytes, pybind11::arg("n"));
  target.cuda->def("partial_fc_mark", &mk::cuda::partial_fc_mark, mk::nogil(),
                   MK_PYARGS(MK_PARTIAL_FC_MARK_CUDA_ARGS));
  target.cuda->def("partial_fc_select", &mk::cuda::partial_fc_select, mk::nogil(),
                   MK_PYARGS(MK_PARTIAL_FC_SELECT_CUDA_ARGS));
#endif
}
