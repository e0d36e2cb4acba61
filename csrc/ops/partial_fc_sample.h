// Partial FC class sampling (kernels: cpu/partial_fc_sample.cpp, cuda/partial_fc_sample.cu).
// mark: flags (n = stop - start,) int32 set to 1 for the classes in [start, stop) that some label
// hits (flags zeroed first); returns their number P (CUDA: synchronises the stream).
// select: adds the m negatives (flag 0) with the smallest sample_key(seed, class), then writes
// index (num_index = P + m,) int64 = the flagged local ids in increasing order and
// local_labels (B,) int64 = each row's position in index, or -1.
#pragma once

#include "signature.h"

#define MK_PARTIAL_FC_MARK_ARGS(X) \
  X(ptr_t, labels) X(int64_t, B) X(int64_t, start) X(int64_t, stop) X(ptr_t, flags)
#define MK_PARTIAL_FC_SELECT_ARGS(X)                                                            \
  X(ptr_t, flags) X(int64_t, start) X(int64_t, stop) X(uint64_t, seed) X(int64_t, m)          \
  X(ptr_t, labels) X(int64_t, B) X(ptr_t, index) X(int64_t, num_index) X(ptr_t, local_labels)
#define MK_PARTIAL_FC_MARK_CUDA_ARGS(X) MK_PARTIAL_FC_MARK_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)
#define MK_PARTIAL_FC_SELECT_CUDA_ARGS(X) MK_PARTIAL_FC_SELECT_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)

namespace mk {
namespace cpu {
int64_t partial_fc_mark(MK_PARAMS(MK_PARTIAL_FC_MARK_ARGS));
void partial_fc_select(MK_PARAMS(MK_PARTIAL_FC_SELECT_ARGS));
}  // namespace cpu
namespace cuda {
int64_t partial_fc_workspace_bytes(int64_t n);
int64_t partial_fc_mark(MK_PARAMS(MK_PARTIAL_FC_MARK_CUDA_ARGS));
void partial_fc_select(MK_PARAMS(MK_PARTIAL_FC_SELECT_CUDA_ARGS));
}  // namespace cuda
}  // namespace mk
