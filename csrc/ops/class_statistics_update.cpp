// Python bindings of class_statistics_update (self-registered; see registry.h).
#include "ops/class_statistics_update.h"
#include "registry.h"

MK_BIND_OP(class_statistics_update) {
  target.cpu.def("class_statistics_update", &mk::cpu::class_statistics_update, mk::nogil(),
                 MK_PYARGS(MK_CLASS_STATISTICS_UPDATE_ARGS));
#ifdef MARGINKIT_WITH_CUDA
  target.cuda->def("class_statistics_update_workspace_bytes", &mk::cuda::class_statistics_update_workspace_bytes,
                   pybind11::arg("B"), pybind11::arg("D"));
  target.cuda->def("class_statistics_update", &mk::cuda::class_statistics_update, mk::nogil(),
                   MK_PYARGS(MK_CLASS_STATISTICS_UPDATE_CUDA_ARGS));
#endif
}
