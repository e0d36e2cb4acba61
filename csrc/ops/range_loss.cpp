// Python bindings of range_loss (self-registered; see registry.h).
#include "ops/range_loss.h"
#include "registry.h"

MK_BIND_OP(range_loss) {
  target.cpu.def("range_loss_forward", &mk::cpu::range_loss_forward, mk::nogil(),
                 MK_PYARGS(MK_RANGE_LOSS_FORWARD_ARGS));
  target.cpu.def("range_loss_backward", &mk::cpu::range_loss_backward, mk::nogil(),
                 MK_PYARGS(MK_RANGE_LOSS_BACKWARD_ARGS));
#ifdef MARGINKIT_WITH_CUDA
  target.cuda->def("range_loss_workspace_bytes", &mk::cuda::range_loss_workspace_bytes, pybind11::arg("B"),
                   pybind11::arg("D"), pybind11::arg("k2"));
  target.cuda->def("range_loss_max_k", &mk::cuda::range_loss_max_k);
  target.cuda->def("range_loss_forward", &mk::cuda::range_loss_forward, mk::nogil(),
                   MK_PYARGS(MK_RANGE_LOSS_FORWARD_CUDA_ARGS));
  target.cuda->def("range_loss_backward", &mk::cuda::range_loss_backward, mk::nogil(),
                   MK_PYARGS(MK_RANGE_LOSS_BACKWARD_CUDA_ARGS));
#endif
}
