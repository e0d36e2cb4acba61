// Row-sparse optimizer steps (kernels: cpu/sparse_optim.cpp, cuda/sparse_optim.cu):
// torch.optim.SGD / AdamW applied in place to rows (R,) int64 (distinct, in [0, C)) of
// weight (C, D); grad (R, D); state tensors (C, D), all of dtype. SGD: initialized (C,) uint8
// or 0. AdamW: step (C,) int64 per-row step counts, each selected one incremented.
#pragma once

#include "signature.h"

#define MK_SPARSE_SGD_STEP_ARGS(X)                                                                   \
  X(ptr_t, weight) X(ptr_t, grad) X(ptr_t, momentum_buffer) X(ptr_t, initialized) X(ptr_t, rows)   \
  X(int64_t, R) X(int64_t, C) X(int64_t, D) X(int, dtype) X(double, lr) X(double, momentum)        \
  X(double, weight_decay) X(double, dampening) X(bool, nesterov)
#define MK_SPARSE_ADAMW_STEP_ARGS(X)                                                           \
  X(ptr_t, weight) X(ptr_t, grad) X(ptr_t, exp_avg) X(ptr_t, exp_avg_sq) X(ptr_t, step)      \
  X(ptr_t, rows) X(int64_t, R) X(int64_t, C) X(int64_t, D) X(int, dtype) X(double, lr)       \
  X(double, beta1) X(double, beta2) X(double, eps) X(double, weight_decay)
#define MK_SPARSE_SGD_STEP_CUDA_ARGS(X) MK_SPARSE_SGD_STEP_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)
#define MK_SPARSE_ADAMW_STEP_CUDA_ARGS(X) MK_SPARSE_ADAMW_STEP_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)

namespace mk {
namespace cpu {
void sparse_sgd_step(MK_PARAMS(MK_SPARSE_SGD_STEP_ARGS));
void sparse_adamw_step(MK_PARAMS(MK_SPARSE_ADAMW_STEP_ARGS));
}  // namespace cpu
namespace cuda {
void sparse_sgd_step(MK_PARAMS(MK_SPARSE_SGD_STEP_CUDA_ARGS));      // workspace unused (pass 0)
void sparse_adamw_step(MK_PARAMS(MK_SPARSE_ADAMW_STEP_CUDA_ARGS));  // workspace unused (pass 0)
}  // namespace cuda
}  // namespace mk
