// Entry points of marginkit._C (declarations shared by bindings.cpp and the
// per-op files csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu).
//
// Conventions (the Python wrapper marginkit/backends/cuda.py guarantees them):
// * every pointer is a tensor's data_ptr() as an integer; tensors are
//   contiguous, on the right device, with the dtypes stated here;
// * "sorted_labels"/"order" are the values and indices of a *stable* sort of
//   the labels (torch.sort(labels, stable=True)); ops work on label segments
//   of that order, so results do not depend on thread scheduling;
// * labels that are not ignore_index lie in [0, C) (validated in Python);
// * CUDA entries take the device index, a cudaStream_t as an integer, and a
//   scratch buffer of <op>_workspace_bytes(...) bytes; they only enqueue work
//   (partial_fc_mark, which must return a count, synchronises the stream).
#pragma once

#include <cstdint>

#include "common.h"

namespace mk {

using ptr_t = std::uintptr_t;  // a tensor's data_ptr(), as a Python int

namespace cpu {

// centers (C, D) float32, updated in place; embeddings (B, D) of emb_dtype.
void class_center_update(ptr_t centers, int64_t C, int64_t D, ptr_t emb, int emb_dtype, int64_t B,
                         ptr_t sorted_labels, ptr_t order, double momentum, int64_t ignore_index);

// counts (C,) int64, cos_sum (C,) float64, sq_sum (C,) float64, accumulated in place.
void class_statistics_update(ptr_t counts, ptr_t cos_sum, ptr_t sq_sum, int64_t C, ptr_t emb,
                             int emb_dtype, ptr_t weight, int w_dtype, int64_t B, int64_t D,
                             ptr_t sorted_labels, ptr_t order, int64_t ignore_index);

// Range loss. Outputs: loss () float32; row_seg (B,) int64 (segment index of each row);
// sel_pairs (B, k2, 2) int64 (per segment: the selected pairs as original row ids, -1 pad);
// sel_coef (B, k2) float64 (d loss / d distance of that pair); closest (4,) int64
// (segments Q, R of the closest pair of class means and their sizes, or -1 -1 0 0 when the
// hinge is inactive); inter_vec (D,) float64 (-2*beta*(mean_Q - mean_R), or 0).
void range_loss_forward(ptr_t emb, int dtype, int64_t B, int64_t D, ptr_t sorted_labels, ptr_t order,
                        int64_t k2, double margin, double alpha, double beta, ptr_t loss, ptr_t row_seg,
                        ptr_t sel_pairs, ptr_t sel_coef, ptr_t closest, ptr_t inter_vec);
// grad_loss () float32; grad_emb (B, D) of dtype.
void range_loss_backward(ptr_t grad_loss, ptr_t emb, int dtype, int64_t B, int64_t D, int64_t k2,
                         ptr_t row_seg, ptr_t sel_pairs, ptr_t sel_coef, ptr_t closest,
                         ptr_t inter_vec, ptr_t grad_emb);

// Partial FC. mark: flags (n = stop - start,) int32 set to 1 for the classes in [start, stop)
// that some label hits (flags zeroed here); returns their number P.
int64_t partial_fc_mark(ptr_t labels, int64_t B, int64_t start, int64_t stop, ptr_t flags);
// select: adds the m negatives (flag 0) with the smallest sample_key(seed, class), then writes
// index (P + m,) int64 = the flagged local ids in increasing order and local_labels (B,) int64.
void partial_fc_select(ptr_t flags, int64_t start, int64_t stop, uint64_t seed, int64_t m,
                       ptr_t labels, int64_t B, ptr_t index, ptr_t local_labels);

// Row-sparse SGD (torch.optim.SGD per row). weight, momentum_buffer (C, D), grad (R, D), all
// of dtype; rows (R,) int64 distinct; initialized (C,) uint8 or 0 (see cuda.py).
void sparse_sgd_step(ptr_t weight, ptr_t grad, ptr_t momentum_buffer, ptr_t initialized, ptr_t rows,
                     int64_t R, int64_t D, int dtype, double lr, double momentum, double weight_decay,
                     double dampening, bool nesterov);
// Row-sparse AdamW (torch.optim.AdamW per row); step (C,) int64 per-row step counts.
void sparse_adamw_step(ptr_t weight, ptr_t grad, ptr_t exp_avg, ptr_t exp_avg_sq, ptr_t step,
                       ptr_t rows, int64_t R, int64_t D, int dtype, double lr, double beta1,
                       double beta2, double eps, double weight_decay);

}  // namespace cpu

namespace cuda {
int runtime_version();
int driver_version();
int device_count();

int64_t class_center_update_workspace_bytes(int64_t B, int64_t D);
void class_center_update(ptr_t centers, int64_t C, int64_t D, ptr_t emb, int emb_dtype, int64_t B,
                         ptr_t sorted_labels, ptr_t order, double momentum, int64_t ignore_index,
                         ptr_t workspace, int device, ptr_t stream);

int64_t class_statistics_update_workspace_bytes(int64_t B, int64_t D);
void class_statistics_update(ptr_t counts, ptr_t cos_sum, ptr_t sq_sum, int64_t C, ptr_t emb,
                             int emb_dtype, ptr_t weight, int w_dtype, int64_t B, int64_t D,
                             ptr_t sorted_labels, ptr_t order, int64_t ignore_index, ptr_t workspace,
                             int device, ptr_t stream);

int64_t range_loss_workspace_bytes(int64_t B, int64_t D, int64_t k2);
int64_t range_loss_max_k();
void range_loss_forward(ptr_t emb, int dtype, int64_t B, int64_t D, ptr_t sorted_labels, ptr_t order,
                        int64_t k2, double margin, double alpha, double beta, ptr_t loss, ptr_t row_seg,
                        ptr_t sel_pairs, ptr_t sel_coef, ptr_t closest, ptr_t inter_vec,
                        ptr_t workspace, int device, ptr_t stream);
void range_loss_backward(ptr_t grad_loss, ptr_t emb, int dtype, int64_t B, int64_t D, int64_t k2,
                         ptr_t row_seg, ptr_t sel_pairs, ptr_t sel_coef, ptr_t closest,
                         ptr_t inter_vec, ptr_t grad_emb, int device, ptr_t stream);

int64_t partial_fc_workspace_bytes(int64_t n);
int64_t partial_fc_mark(ptr_t labels, int64_t B, int64_t start, int64_t stop, ptr_t flags,
                        ptr_t workspace, int device, ptr_t stream);
void partial_fc_select(ptr_t flags, int64_t start, int64_t stop, uint64_t seed, int64_t m,
                       ptr_t labels, int64_t B, ptr_t index, ptr_t local_labels, ptr_t workspace,
                       int device, ptr_t stream);

void sparse_sgd_step(ptr_t weight, ptr_t grad, ptr_t momentum_buffer, ptr_t initialized, ptr_t rows,
                     int64_t R, int64_t D, int dtype, double lr, double momentum, double weight_decay,
                     double dampening, bool nesterov, int device, ptr_t stream);
void sparse_adamw_step(ptr_t weight, ptr_t grad, ptr_t exp_avg, ptr_t exp_avg_sq, ptr_t step,
                       ptr_t rows, int64_t R, int64_t D, int dtype, double lr, double beta1,
                       double beta2, double eps, double weight_decay, int device, ptr_t stream);
}  // namespace cuda

}  // namespace mk
