// Per-class statistics, CUDA (see csrc/cpu/class_statistics_update.cpp).
// 1) one warp per sorted position: x^.w^ and ||x^ - w^||^2 of that row (float64);
// 2) one thread per label segment: sums its rows in sorted order and adds to the class
//    accumulators. Deterministic: no floating-point atomics.
#include "cuda/cuda_common.cuh"
#include "ops/class_statistics_update.h"

namespace mk {
namespace cuda {

namespace {
constexpr int kThreads = 256;

template <typename TX, typename TW>
__global__ void __launch_bounds__(kThreads)
row_stats_kernel(const TX* __restrict__ x, const TW* __restrict__ w, int64_t B, int64_t D,
                 const int64_t* __restrict__ sl, const int64_t* __restrict__ order, int64_t ignore_index,
                 double* __restrict__ vals) {
  const int64_t p = (int64_t)blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (p >= B) return;
  const int64_t c = sl[p];
  if (c == ignore_index) {
    if (lane == 0) { vals[2 * p] = 0.0; vals[2 * p + 1] = 0.0; }
    return;
  }
  const int64_t xr = order[p] * D, wr = c * D;
  double xx = 0.0, ww = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const double a = (double)DevIO<TX>::load(x, xr + d), b = (double)DevIO<TW>::load(w, wr + d);
    xx += a * a;
    ww += b * b;
  }
  xx = warp_sum(xx);
  ww = warp_sum(ww);
  const double ix = 1.0 / fmax(sqrt(xx), kNormEps), iw = 1.0 / fmax(sqrt(ww), kNormEps);
  double dot = 0.0, dist = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const double a = (double)DevIO<TX>::load(x, xr + d) * ix, b = (double)DevIO<TW>::load(w, wr + d) * iw;
    dot += a * b;
    dist += (a - b) * (a - b);
  }
  dot = warp_sum(dot);
  dist = warp_sum(dist);
  if (lane == 0) { vals[2 * p] = dot; vals[2 * p + 1] = dist; }
}

__global__ void segment_accumulate_kernel(int64_t* __restrict__ counts, double* __restrict__ cos_sum,
                                          double* __restrict__ sq_sum, const int64_t* __restrict__ sl,
                                          const double* __restrict__ vals, const int64_t* __restrict__ seg_start,
                                          const int64_t* __restrict__ num_seg, int64_t B, int64_t ignore_index) {
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= B || g >= *num_seg) return;
  const int64_t p0 = seg_start[g], p1 = seg_start[g + 1];
  const int64_t c = sl[p0];
  if (c == ignore_index) return;
  double cs = 0.0, sq = 0.0;
  for (int64_t p = p0; p < p1; ++p) { cs += vals[2 * p]; sq += vals[2 * p + 1]; }
  counts[c] += p1 - p0;
  cos_sum[c] += cs;
  sq_sum[c] += sq;
}

// The scratch buffer, declared once: measured (base 0) by the _bytes entry, carved by the launch.
struct Workspace {
  int64_t *seg_start, *seg_id, *num_seg;
  double* vals;
  int64_t bytes;
  Workspace(ptr_t base, int64_t B) {
    Carver cv(base);
    seg_start = cv.take<int64_t>(B + 1);
    seg_id = cv.take<int64_t>(B);
    num_seg = cv.take<int64_t>(1);
    vals = cv.take<double>(2 * B);
    bytes = cv.bytes();
  }
};
}  // namespace

int64_t class_statistics_update_workspace_bytes(int64_t B, int64_t D) {
  check_size("class_statistics_update_workspace_bytes", "B", B);
  return Workspace(0, B).bytes;
}

void class_statistics_update(MK_PARAMS(MK_CLASS_STATISTICS_UPDATE_CUDA_ARGS)) {
  constexpr const char* fn = "class_statistics_update";
  check_size(fn, "C", C);
  check_size(fn, "D", D);
  check_size(fn, "B", B);
  check_product(fn, "C * D", C, D);
  check_product(fn, "B * D", B, D);
  check_dtype(fn, "emb_dtype", emb_dtype);
  check_dtype(fn, "w_dtype", w_dtype);
  if (B == 0) return;
  check_ptrs(fn, {{"counts", counts}, {"cos_sum", cos_sum}, {"sq_sum", sq_sum}, {"emb", emb}, {"weight", weight},
                  {"sorted_labels", sorted_labels}, {"order", order}, {"workspace", workspace}});
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream);
  Workspace ws(workspace, B);
  int64_t* seg_start = ws.seg_start;
  int64_t* seg_id = ws.seg_id;
  int64_t* num_seg = ws.num_seg;
  double* vals = ws.vals;
  const int64_t* sl = reinterpret_cast<const int64_t*>(sorted_labels);
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  launch_segments(sl, B, seg_start, seg_id, num_seg, stream_h);
  dispatch_dev_float((DType)emb_dtype, [&](auto xtag) {
    using TX = decltype(xtag);
    dispatch_dev_float((DType)w_dtype, [&](auto wtag) {
      using TW = decltype(wtag);
      row_stats_kernel<TX, TW><<<ceil_div_u(B, kThreads / 32), kThreads, 0, stream_h>>>(
          reinterpret_cast<const TX*>(emb), reinterpret_cast<const TW*>(weight), B, D, sl, ord, ignore_index, vals);
      MK_CUDA_CHECK_LAUNCH();
    });
  });
  segment_accumulate_kernel<<<ceil_div_u(B, 128), 128, 0, stream_h>>>(
      reinterpret_cast<int64_t*>(counts), reinterpret_cast<double*>(cos_sum), reinterpret_cast<double*>(sq_sum), sl,
      vals, seg_start, num_seg, B, ignore_index);
  MK_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mk
