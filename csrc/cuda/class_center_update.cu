// IR-Softmax class-center running update, CUDA (see csrc/cpu/class_center_update.cpp).
// 1) one warp per row: inverse norm of each row (float64);
// 2) one block per label segment: threads own columns d and sum the segment's normalised
//    rows in sorted order, then the block normalises the new center. No atomics.
#include "cuda/cuda_common.cuh"
#include "ops/class_center_update.h"

namespace mk {
namespace cuda {

namespace {
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
row_inv_norm_kernel(const T* __restrict__ x, int64_t B, int64_t D, const int64_t* __restrict__ order,
                    double* __restrict__ inv_norm) {
  const int64_t p = (int64_t)blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (p >= B) return;
  const int64_t row = order[p] * D;
  double ss = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const double v = (double)DevIO<T>::load(x, row + d);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) inv_norm[p] = 1.0 / fmax(sqrt(ss), kNormEps);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
center_update_kernel(float* __restrict__ centers, int64_t D, const T* __restrict__ x,
                     const int64_t* __restrict__ sl, const int64_t* __restrict__ order,
                     const double* __restrict__ inv_norm, const int64_t* __restrict__ seg_start,
                     const int64_t* __restrict__ num_seg, double momentum, int64_t ignore_index) {
  __shared__ double red[32];
  const int64_t g = blockIdx.x;
  if (g >= *num_seg) return;
  const int64_t p0 = seg_start[g], p1 = seg_start[g + 1];
  const int64_t c = sl[p0];
  if (c == ignore_index) return;
  const double w_new = (1.0 - momentum) / (double)(p1 - p0);
  float* ctr = centers + c * D;
  double ss = 0.0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double acc = 0.0;
    for (int64_t p = p0; p < p1; ++p) acc += (double)DevIO<T>::load(x, order[p] * D + d) * inv_norm[p];
    const double v = momentum * (double)ctr[d] + w_new * acc;
    ss += v * v;
    ctr[d] = (float)v;  // each column is owned by one thread: rescaled below
  }
  const double inv = 1.0 / fmax(sqrt(block_sum(ss, red)), kNormEps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ctr[d] = (float)((double)ctr[d] * inv);
}

// The scratch buffer, declared once: measured (base 0) by the _bytes entry, carved by the launch.
struct Workspace {
  int64_t *seg_start, *seg_id, *num_seg;
  double* inv_norm;
  int64_t bytes;
  Workspace(ptr_t base, int64_t B) {
    Carver cv(base);
    seg_start = cv.take<int64_t>(B + 1);
    seg_id = cv.take<int64_t>(B);
    num_seg = cv.take<int64_t>(1);
    inv_norm = cv.take<double>(B);
    bytes = cv.bytes();
  }
};
}  // namespace

int64_t class_center_update_workspace_bytes(int64_t B, int64_t D) {
  check_size("class_center_update_workspace_bytes", "B", B);
  return Workspace(0, B).bytes;
}

void class_center_update(MK_PARAMS(MK_CLASS_CENTER_UPDATE_CUDA_ARGS)) {
  constexpr const char* fn = "class_center_update";
  check_size(fn, "C", C);
  check_size(fn, "D", D);
  check_size(fn, "B", B);
  check_product(fn, "C * D", C, D);
  check_product(fn, "B * D", B, D);
  check_dtype(fn, "emb_dtype", emb_dtype);
  if (B == 0 || D == 0) return;
  check_ptrs(fn, {{"centers", centers}, {"emb", emb}, {"sorted_labels", sorted_labels}, {"order", order},
                  {"workspace", workspace}});
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream);
  Workspace ws(workspace, B);
  int64_t* seg_start = ws.seg_start;
  int64_t* seg_id = ws.seg_id;
  int64_t* num_seg = ws.num_seg;
  double* inv_norm = ws.inv_norm;
  const int64_t* sl = reinterpret_cast<const int64_t*>(sorted_labels);
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  launch_segments(sl, B, seg_start, seg_id, num_seg, stream_h);
  dispatch_dev_float((DType)emb_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = reinterpret_cast<const T*>(emb);
    row_inv_norm_kernel<T><<<ceil_div_u(B, kThreads / 32), kThreads, 0, stream_h>>>(x, B, D, ord, inv_norm);
    MK_CUDA_CHECK_LAUNCH();
    center_update_kernel<T><<<(unsigned)B, kThreads, 0, stream_h>>>(reinterpret_cast<float*>(centers), D, x, sl,
                                                                  ord, inv_norm, seg_start, num_seg, momentum,
                                                                  ignore_index);
    MK_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cuda
}  // namespace mk
