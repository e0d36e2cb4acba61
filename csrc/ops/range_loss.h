// Range loss forward and backward (kernels: cpu/range_loss.cpp, cuda/range_loss.cu).
// Forward outputs: loss () float32 (float64 for float64 emb); row_seg (B,) int64 (segment of each
// row); sel_pairs (B, k2, 2) int64 (per segment: the selected pairs as row ids, -1 pad); sel_coef
// (B, k2) float64 (d loss / d distance of that pair); closest (4,) int64 (segments Q, R of the
// closest pair of class means and their sizes, or -1 -1 0 0 when the hinge is inactive);
// inter_vec (D,) float64 (-2*beta*(mean_Q - mean_R), or 0). Backward: grad_loss () like loss,
// grad_emb (B, D) of dtype; it reads the forward's outputs and checks their index values.
#pragma once

#include "signature.h"

#define MK_RANGE_LOSS_FORWARD_ARGS(X)                                                               \
  X(ptr_t, emb) X(int, dtype) X(int64_t, B) X(int64_t, D) X(ptr_t, sorted_labels) X(ptr_t, order) \
  X(int64_t, k2) X(double, margin) X(double, alpha) X(double, beta) X(ptr_t, loss)                 \
  X(ptr_t, row_seg) X(ptr_t, sel_pairs) X(ptr_t, sel_coef) X(ptr_t, closest) X(ptr_t, inter_vec)
#define MK_RANGE_LOSS_BACKWARD_ARGS(X)                                                      \
  X(ptr_t, grad_loss) X(ptr_t, emb) X(int, dtype) X(int64_t, B) X(int64_t, D) X(int64_t, k2) \
  X(ptr_t, row_seg) X(ptr_t, sel_pairs) X(ptr_t, sel_coef) X(ptr_t, closest)                \
  X(ptr_t, inter_vec) X(ptr_t, grad_emb)
#define MK_RANGE_LOSS_FORWARD_CUDA_ARGS(X) MK_RANGE_LOSS_FORWARD_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)
#define MK_RANGE_LOSS_BACKWARD_CUDA_ARGS(X) MK_RANGE_LOSS_BACKWARD_ARGS(X) MK_CUDA_LAUNCH_ARGS(X)

namespace mk {
namespace cpu {
void range_loss_forward(MK_PARAMS(MK_RANGE_LOSS_FORWARD_ARGS));
void range_loss_backward(MK_PARAMS(MK_RANGE_LOSS_BACKWARD_ARGS));
}  // namespace cpu
namespace cuda {
int64_t range_loss_workspace_bytes(int64_t B, int64_t D, int64_t k2);
int64_t range_loss_max_k();
void range_loss_forward(MK_PARAMS(MK_RANGE_LOSS_FORWARD_CUDA_ARGS));
void range_loss_backward(MK_PARAMS(MK_RANGE_LOSS_BACKWARD_CUDA_ARGS));  // workspace unused (pass 0)
}  // namespace cuda
}  // namespace mk
