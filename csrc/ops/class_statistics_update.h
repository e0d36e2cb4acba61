// Per-class statistics for adaptive margins, accumulated in place (kernels:
// cpu/class_statistics_update.cpp, cuda/class_statistics_update.cu). counts (C,) int64,
// cos_sum, sq_sum (C,) float64; emb (B, D) of emb_dtype, weight (C, D) of w_dtype;
// sorted_labels, order (B,) int64 (stable sort; labels in [0, C) or ignore_index).
#pragma once

#include "signature.h"

#define MK_CLASS_STATISTICS_UPDATE_ARGS(X)                                                            \
  X(ptr_t, counts) X(ptr_t, cos_sum) X(ptr_t, sq_sum) X(int64_t, C) X(ptr_t, emb) X(int, emb_dtype) \
  X(ptr_t, weight) X(int, w_dtype) X(int64_t, B) X(int64_t, D) X(ptr_t, sorted_labels)              \
  X(ptr_t, order) X(int64_t, ignore_index)
#define MK_CLASS_STATISTICS_UPDATE_CUDA_ARGS(X) MK_CLASS_STATISTICS_UPDATE_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)

namespace mk {
namespace cpu {
void class_statistics_update(MK_PARAMS(MK_CLASS_STATISTICS_UPDATE_ARGS));
}  // namespace cpu
namespace cuda {
int64_t class_statistics_update_workspace_bytes(int64_t B, int64_t D);
void class_statistics_update(MK_PARAMS(MK_CLASS_STATISTICS_UPDATE_CUDA_ARGS));
}  // namespace cuda
}  // namespace mk
