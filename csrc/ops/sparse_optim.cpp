// Python bindings of sparse_optim (self-registered; see registry.h).
#include "ops/sparse_optim.h"
#include "registry.h"

MK_BIND_OP(sparse_optim) {
  target.cpu.def("sparse_sgd_step", &mk::cpu::sparse_sgd_step, mk::nogil(), MK_PYARGS(MK_SPARSE_SGD_STEP_ARGS));
  target.cpu.def("sparse_adamw_step", &mk::cpu::sparse_adamw_step, mk::nogil(),
                 MK_PYARGS(MK_SPARSE_ADAMW_STEP_ARGS));
#ifdef MARGINKIT_WITH_CUDA
  target.cuda->def("sparse_sgd_step", &mk::cuda::sparse_sgd_step, mk::nogil(),
                   MK_PYARGS(MK_SPARSE_SGD_STEP_CUDA_ARGS));
  target.cuda->def("sparse_adamw_step", &mk::cuda::sparse_adamw_step, mk::nogil(),
                   MK_PYARGS(MK_SPARSE_ADAMW_STEP_CUDA_ARGS));
#endif
}
