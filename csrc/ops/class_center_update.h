// IR-Softmax class-center update, in place (kernels: cpu/class_center_update.cpp,
// cuda/class_center_update.cu). centers (C, D) float32; emb (B, D) of emb_dtype (mk::DType code);
// sorted_labels, order (B,) int64: values and indices of a stable sort of the labels, every label
// in [0, C) or ignore_index.
#pragma once

#include "signature.h"

#define MK_CLASS_CENTER_UPDATE_ARGS(X)                                                           \
  X(ptr_t, centers) X(int64_t, C) X(int64_t, D) X(ptr_t, emb) X(int, emb_dtype) X(int64_t, B) \
  X(ptr_t, sorted_labels) X(ptr_t, order) X(double, momentum) X(int64_t, ignore_index)
#define MK_CLASS_CENTER_UPDATE_CUDA_ARGS(X) MK_CLASS_CENTER_UPDATE_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)

namespace mk {
namespace cpu {
void class_center_update(MK_PARAMS(MK_CLASS_CENTER_UPDATE_ARGS));
}  // namespace cpu
namespace cuda {
int64_t class_center_update_workspace_bytes(int64_t B, int64_t D);
void class_center_update(MK_PARAMS(MK_CLASS_CENTER_UPDATE_CUDA_ARGS));
}  // namespace cuda
}  // namespace mk
