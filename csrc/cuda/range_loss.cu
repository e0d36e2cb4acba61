// Range loss forward and backward, CUDA (definitions and tie rules: csrc/cpu/range_loss.cpp).
//
// Forward, all on the stream, no host sync, no floating-point atomics:
//  segments     label segments of the sorted labels (G classes, G unknown to the host: kernels
//               are launched for B >= G segments and idle blocks exit);
//  pair_topk    grid (B, S): block (g, s) takes every (S*W)-th pair (i < j) of segment g, one
//               warp per pair (lanes over D, float64), keeps per-warp top-k2 lists in shared
//               memory, merges them into one sorted list per block;
//  select       one thread per segment: S-way merge -> the k' largest, harmonic term, d/dd_j;
//  means        one block per segment: class means (float64);
//  closest      fixed grid of warps over the G x G pairs of means, per-block minimum;
//  finalize     one block: minimum over blocks, sum of intra terms, hinge, loss, inter_vec.
// Backward: one block per row gathers the selected pairs of its class (a row is found in a
// pair by its index) and the hinge term: deterministic, no atomics.
#include <cfloat>

#include "cuda/cuda_common.cuh"
#include "ops/range_loss.h"

namespace mk {
namespace cuda {

namespace {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxK = 384;            // kWarps * kMaxK * 16 bytes of shared memory = 48 KiB
constexpr int kMaxSplits = 16;
constexpr int kClosestBlocks = 264;
constexpr int64_t kNoKey = INT64_MAX;

struct Cand {
  double d;
  int64_t key;
};

// "a ranks before b" among the largest distances (empty slots: d = -1, key = max).
__device__ __forceinline__ bool better(double ad, int64_t ak, double bd, int64_t bk) {
  return ad > bd || (ad == bd && ak < bk);
}
// "a ranks before b" for the smallest distance between means.
__device__ __forceinline__ bool closer(double ad, int64_t ak, double bd, int64_t bk) {
  return ad < bd || (ad == bd && ak < bk);
}

inline int splits_for(int64_t k2) { return (int)std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, 64 / k2)); }

template <typename T>
__device__ __forceinline__ double warp_sqdist(const T* __restrict__ x, int64_t ra, int64_t rb, int64_t D, int lane) {
  double s = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const double t = (double)DevIO<T>::load(x, ra + d) - (double)DevIO<T>::load(x, rb + d);
    s += t * t;
  }
  return warp_sum(s);
}

__global__ void row_seg_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ seg_id, int64_t B,
                               int64_t* __restrict__ row_seg) {
  const int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (p < B) row_seg[order[p]] = seg_id[p];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
pair_topk_kernel(const T* __restrict__ x, int64_t D, const int64_t* __restrict__ order,
                 const int64_t* __restrict__ seg_start, const int64_t* __restrict__ num_seg, int64_t k2, int S,
                 Cand* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* wd = reinterpret_cast<double*>(smem_raw);        // [kWarps][k2]
  int64_t* wk = reinterpret_cast<int64_t*>(wd + kWarps * k2);  // [kWarps][k2]
  const int64_t g = blockIdx.x;
  const int s = blockIdx.y;
  if (g >= *num_seg) return;
  const int64_t p0 = seg_start[g], n = seg_start[g + 1] - p0;
  if (n < 2) return;  // select_kernel does not read partials of such segments
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t j = threadIdx.x; j < kWarps * k2; j += blockDim.x) { wd[j] = -1.0; wk[j] = kNoKey; }
  __syncthreads();
  double* myd = wd + warp * k2;
  int64_t* myk = wk + warp * k2;
  const int64_t total = n * n, stride = (int64_t)S * kWarps;
  for (int64_t t = (int64_t)s * kWarps + warp; t < total; t += stride) {
    const int64_t i = t / n, j = t - i * n;
    if (j <= i) continue;  // warp-uniform
    const double dist = warp_sqdist(x, order[p0 + i] * D, order[p0 + j] * D, D, lane);
    if (lane == 0) {
      const int64_t key = i * n + j;
      if (better(dist, key, myd[k2 - 1], myk[k2 - 1])) {  // insert, keeping the list sorted
        int64_t q = k2 - 1;
        while (q > 0 && better(dist, key, myd[q - 1], myk[q - 1])) {
          myd[q] = myd[q - 1];
          myk[q] = myk[q - 1];
          --q;
        }
        myd[q] = dist;
        myk[q] = key;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // kWarps-way merge of sorted lists
    int head[kWarps];
    for (int w = 0; w < kWarps; ++w) head[w] = 0;
    Cand* out = partial + ((int64_t)g * S + s) * k2;
    for (int64_t q = 0; q < k2; ++q) {
      int bw = 0;
      for (int w = 1; w < kWarps; ++w)
        if (better(wd[w * k2 + head[w]], wk[w * k2 + head[w]], wd[bw * k2 + head[bw]], wk[bw * k2 + head[bw]]))
          bw = w;
      out[q].d = wd[bw * k2 + head[bw]];
      out[q].key = wk[bw * k2 + head[bw]];
      if (head[bw] < k2 - 1) ++head[bw];
      else { wd[bw * k2 + head[bw]] = -2.0; wk[bw * k2 + head[bw]] = kNoKey; }  // exhausted
    }
  }
}

__global__ void select_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ seg_start,
                              const int64_t* __restrict__ num_seg, int64_t B, int64_t k2, int S, double alpha,
                              const Cand* __restrict__ partial, int64_t* __restrict__ sel,
                              double* __restrict__ coef, double* __restrict__ intra) {
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= B) return;
  int64_t* mysel = sel + g * k2 * 2;
  double* mycoef = coef + g * k2;
  const int64_t G = *num_seg;
  int64_t kk = 0;
  double s_inv = 0.0;
  bool zero = false;
  if (g < G) {
    const int64_t p0 = seg_start[g], n = seg_start[g + 1] - p0;
    if (n >= 2) {
      const int64_t pairs = n * (n - 1) / 2;
      kk = k2 < pairs ? k2 : pairs;
      int head[kMaxSplits];
      for (int s = 0; s < S; ++s) head[s] = 0;
      const Cand* base = partial + g * S * k2;
      for (int64_t q = 0; q < kk; ++q) {
        int bs = -1;
        double bd = -3.0;
        int64_t bk = kNoKey;
        for (int s = 0; s < S; ++s) {
          if (head[s] >= k2) continue;
          const Cand c = base[s * k2 + head[s]];
          if (c.key == kNoKey) continue;
          if (bs < 0 || better(c.d, c.key, bd, bk)) { bs = s; bd = c.d; bk = c.key; }
        }
        ++head[bs];  // bs >= 0: the lists hold all `pairs` candidates between them
        mysel[2 * q] = order[p0 + bk / n];
        mysel[2 * q + 1] = order[p0 + bk % n];
        mycoef[q] = bd;  // the distance, for now
        if (!(bd > 0.0)) zero = true;
        else s_inv += 1.0 / bd;
      }
    }
  }
  for (int64_t q = 0; q < kk; ++q) {
    if (zero) { mycoef[q] = 0.0; continue; }
    const double t = s_inv * mycoef[q];
    mycoef[q] = alpha * (double)kk / (t * t);
  }
  for (int64_t q = kk; q < k2; ++q) { mysel[2 * q] = -1; mysel[2 * q + 1] = -1; mycoef[q] = 0.0; }
  if (g < G) intra[g] = (kk > 0 && !zero) ? (double)kk / s_inv : 0.0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
means_kernel(const T* __restrict__ x, int64_t D, const int64_t* __restrict__ order,
             const int64_t* __restrict__ seg_start, const int64_t* __restrict__ num_seg, double* __restrict__ means) {
  const int64_t g = blockIdx.x;
  if (g >= *num_seg) return;
  const int64_t p0 = seg_start[g], p1 = seg_start[g + 1];
  const double inv_n = 1.0 / (double)(p1 - p0);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double acc = 0.0;
    for (int64_t p = p0; p < p1; ++p) acc += (double)DevIO<T>::load(x, order[p] * D + d);
    means[g * D + d] = acc * inv_n;
  }
}

__global__ void __launch_bounds__(kThreads)
closest_kernel(const double* __restrict__ means, int64_t D, const int64_t* __restrict__ num_seg,
               Cand* __restrict__ partial) {
  __shared__ double bd[kWarps];
  __shared__ int64_t bk[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t G = *num_seg, total = G * G;
  const int64_t nwarps = (int64_t)gridDim.x * kWarps;
  double best = DBL_MAX;
  int64_t best_key = kNoKey;
  for (int64_t t = (int64_t)blockIdx.x * kWarps + warp; t < total; t += nwarps) {
    const int64_t a = t / G, b = t - a * G;
    if (b <= a) continue;
    double s = 0.0;
    for (int64_t d = lane; d < D; d += 32) {
      const double v = means[a * D + d] - means[b * D + d];
      s += v * v;
    }
    s = warp_sum(s);
    if (closer(s, t, best, best_key)) { best = s; best_key = t; }
  }
  if (lane == 0) { bd[warp] = best; bk[warp] = best_key; }
  __syncthreads();
  if (threadIdx.x == 0) {
    double b0 = bd[0];
    int64_t k0 = bk[0];
    for (int w = 1; w < kWarps; ++w)
      if (closer(bd[w], bk[w], b0, k0)) { b0 = bd[w]; k0 = bk[w]; }
    partial[blockIdx.x].d = b0;
    partial[blockIdx.x].key = k0;
  }
}

template <typename LossT>
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const double* __restrict__ intra, const double* __restrict__ means, int64_t D,
                const int64_t* __restrict__ seg_start, const int64_t* __restrict__ num_seg,
                const Cand* __restrict__ closest_partial, int nblocks, double margin, double alpha, double beta,
                LossT* __restrict__ loss, int64_t* __restrict__ closest, double* __restrict__ inter_vec) {
  __shared__ double red[32];
  __shared__ int64_t pair[2];
  __shared__ int active;
  const int64_t G = *num_seg;
  double part = 0.0;
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) part += intra[g];
  const double intra_sum = block_sum(part, red);
  if (threadIdx.x == 0) {
    double inter = 0.0;
    active = 0;
    closest[0] = -1; closest[1] = -1; closest[2] = 0; closest[3] = 0;
    if (G >= 2) {
      double b = DBL_MAX;
      int64_t k = kNoKey;
      for (int i = 0; i < nblocks; ++i)
        if (closer(closest_partial[i].d, closest_partial[i].key, b, k)) { b = closest_partial[i].d; k = closest_partial[i].key; }
      if (margin - b > 0.0) {
        inter = margin - b;
        active = 1;
        pair[0] = k / G;
        pair[1] = k % G;
        closest[0] = pair[0];
        closest[1] = pair[1];
        closest[2] = seg_start[pair[0] + 1] - seg_start[pair[0]];
        closest[3] = seg_start[pair[1] + 1] - seg_start[pair[1]];
      }
    }
    *loss = (LossT)(alpha * intra_sum + beta * inter);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    inter_vec[d] = active ? -2.0 * beta * (means[pair[0] * D + d] - means[pair[1] * D + d]) : 0.0;
}

template <typename T, typename LossT>
__global__ void __launch_bounds__(128)
backward_kernel(const LossT* __restrict__ grad_loss, const T* __restrict__ x, int64_t D, int64_t k2,
                const int64_t* __restrict__ row_seg, const int64_t* __restrict__ sel, const double* __restrict__ coef,
                const int64_t* __restrict__ closest, const double* __restrict__ inter_vec, T* __restrict__ gx) {
  const int64_t r = blockIdx.x;
  const int64_t g = row_seg[r];
  const double gout = (double)*grad_loss;
  const int64_t q0 = closest[0], q1 = closest[1];
  const double n0 = (double)closest[2], n1 = (double)closest[3];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double acc = 0.0;
    for (int64_t j = 0; j < k2; ++j) {
      const int64_t a = sel[(g * k2 + j) * 2], b = sel[(g * k2 + j) * 2 + 1];
      if (a < 0) break;
      if (a != r && b != r) continue;
      const double c = 2.0 * coef[g * k2 + j] * (a == r ? 1.0 : -1.0);
      if (c == 0.0) continue;
      acc += c * ((double)DevIO<T>::load(x, a * D + d) - (double)DevIO<T>::load(x, b * D + d));
    }
    if (g == q0) acc += inter_vec[d] / n0;
    if (g == q1) acc -= inter_vec[d] / n1;
    DevIO<T>::store(gx, r * D + d, (float)(gout * acc));
  }
}

// float64 gradients are stored without the float round trip
template <typename LossT>
__global__ void __launch_bounds__(128)
backward_kernel_f64(const LossT* __restrict__ grad_loss, const double* __restrict__ x, int64_t D, int64_t k2,
                    const int64_t* __restrict__ row_seg, const int64_t* __restrict__ sel,
                    const double* __restrict__ coef, const int64_t* __restrict__ closest,
                    const double* __restrict__ inter_vec, double* __restrict__ gx) {
  const int64_t r = blockIdx.x;
  const int64_t g = row_seg[r];
  const double gout = (double)*grad_loss;
  const int64_t q0 = closest[0], q1 = closest[1];
  const double n0 = (double)closest[2], n1 = (double)closest[3];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double acc = 0.0;
    for (int64_t j = 0; j < k2; ++j) {
      const int64_t a = sel[(g * k2 + j) * 2], b = sel[(g * k2 + j) * 2 + 1];
      if (a < 0) break;
      if (a != r && b != r) continue;
      const double c = 2.0 * coef[g * k2 + j] * (a == r ? 1.0 : -1.0);
      if (c == 0.0) continue;
      acc += c * (x[a * D + d] - x[b * D + d]);
    }
    if (g == q0) acc += inter_vec[d] / n0;
    if (g == q1) acc -= inter_vec[d] / n1;
    gx[r * D + d] = gout * acc;
  }
}

struct Layout {
  int64_t *seg_start, *seg_id, *num_seg;
  Cand* partial;
  double* intra;
  double* means;
  Cand* closest_partial;
};

Layout carve(ptr_t base, int64_t B, int64_t D, int64_t k2, int64_t* bytes) {
  Carver cv(base);
  Layout l;
  l.seg_start = cv.take<int64_t>(B + 1);
  l.seg_id = cv.take<int64_t>(B);
  l.num_seg = cv.take<int64_t>(1);
  l.partial = cv.take<Cand>(B * splits_for(k2) * k2);
  l.intra = cv.take<double>(B);
  l.means = cv.take<double>(B * D);
  l.closest_partial = cv.take<Cand>(kClosestBlocks);
  if (bytes) *bytes = cv.bytes();
  return l;
}
}  // namespace

int64_t range_loss_max_k() { return kMaxK; }

// Sizes shared by forward and backward (k2 within the kernels' limit).
static void check_range_sizes(const char* fn, int64_t B, int64_t D, int64_t k2) {
  check_size(fn, "B", B);
  check_size(fn, "D", D);
  MK_CHECK(k2 >= 1 && k2 <= kMaxK, std::string(fn) + ": k2 = " + str(k2) + " must be in [1, " + str(kMaxK) + "] on CUDA");
  check_product(fn, "B * D", B, D);
  check_product(fn, "B * k2 * 2", B, 2 * k2);
}

int64_t range_loss_workspace_bytes(int64_t B, int64_t D, int64_t k2) {
  check_range_sizes("range_loss_workspace_bytes", B, D, k2);
  int64_t bytes = 0;
  carve(0, B, D, k2, &bytes);
  return bytes;
}

void range_loss_forward(MK_PARAMS(MK_RANGE_LOSS_FORWARD_CUDA_ARGS)) {
  constexpr const char* fn = "range_loss_forward";
  check_dtype(fn, "dtype", dtype);
  check_range_sizes(fn, B, D, k2);
  if (B == 0) return;  // the wrapper fills the outputs
  check_ptrs(fn, {{"emb", emb}, {"sorted_labels", sorted_labels}, {"order", order}, {"loss", loss},
                  {"row_seg", row_seg}, {"sel_pairs", sel_pairs}, {"sel_coef", sel_coef}, {"closest", closest},
                  {"workspace", workspace}});
  const ptr_t stream_p = stream;
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream_p);
  Layout l = carve(workspace, B, D, k2, nullptr);
  const int S = splits_for(k2);
  const int64_t* sl = reinterpret_cast<const int64_t*>(sorted_labels);
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  launch_segments(sl, B, l.seg_start, l.seg_id, l.num_seg, stream_h);
  row_seg_kernel<<<ceil_div_u(B, 256), 256, 0, stream_h>>>(ord, l.seg_id, B, reinterpret_cast<int64_t*>(row_seg));
  MK_CUDA_CHECK_LAUNCH();
  const size_t smem = (size_t)kWarps * (size_t)k2 * (sizeof(double) + sizeof(int64_t));
  dispatch_dev_float((DType)dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = reinterpret_cast<const T*>(emb);
    pair_topk_kernel<T><<<dim3((unsigned)B, (unsigned)S), kThreads, smem, stream_h>>>(x, D, ord, l.seg_start,
                                                                                   l.num_seg, k2, S, l.partial);
    MK_CUDA_CHECK_LAUNCH();
    select_kernel<<<ceil_div_u(B, 128), 128, 0, stream_h>>>(ord, l.seg_start, l.num_seg, B, k2, S, alpha, l.partial,
                                                           reinterpret_cast<int64_t*>(sel_pairs),
                                                           reinterpret_cast<double*>(sel_coef), l.intra);
    MK_CUDA_CHECK_LAUNCH();
    means_kernel<T><<<(unsigned)B, kThreads, 0, stream_h>>>(x, D, ord, l.seg_start, l.num_seg, l.means);
    MK_CUDA_CHECK_LAUNCH();
  });
  closest_kernel<<<kClosestBlocks, kThreads, 0, stream_h>>>(l.means, D, l.num_seg, l.closest_partial);
  MK_CUDA_CHECK_LAUNCH();
  if ((DType)dtype == DType::f64) {
    finalize_kernel<double><<<1, kThreads, 0, stream_h>>>(
        l.intra, l.means, D, l.seg_start, l.num_seg, l.closest_partial, kClosestBlocks, margin, alpha, beta,
        reinterpret_cast<double*>(loss), reinterpret_cast<int64_t*>(closest), reinterpret_cast<double*>(inter_vec));
  } else {
    finalize_kernel<float><<<1, kThreads, 0, stream_h>>>(
        l.intra, l.means, D, l.seg_start, l.num_seg, l.closest_partial, kClosestBlocks, margin, alpha, beta,
        reinterpret_cast<float*>(loss), reinterpret_cast<int64_t*>(closest), reinterpret_cast<double*>(inter_vec));
  }
  MK_CUDA_CHECK_LAUNCH();
}

void range_loss_backward(MK_PARAMS(MK_RANGE_LOSS_BACKWARD_CUDA_ARGS)) {
  constexpr const char* fn = "range_loss_backward";
  check_dtype(fn, "dtype", dtype);
  check_range_sizes(fn, B, D, k2);
  if (B == 0 || D == 0) return;
  check_ptrs(fn, {{"grad_loss", grad_loss}, {"emb", emb}, {"row_seg", row_seg}, {"sel_pairs", sel_pairs},
                  {"sel_coef", sel_coef}, {"closest", closest}, {"inter_vec", inter_vec}, {"grad_emb", grad_emb}});
  const ptr_t stream_p = stream;
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream_p);
  const int64_t* rs = reinterpret_cast<const int64_t*>(row_seg);
  const int64_t* sp = reinterpret_cast<const int64_t*>(sel_pairs);
  const double* sc = reinterpret_cast<const double*>(sel_coef);
  const int64_t* cl = reinterpret_cast<const int64_t*>(closest);
  const double* iv = reinterpret_cast<const double*>(inter_vec);
  if ((DType)dtype == DType::f64) {
    backward_kernel_f64<double><<<(unsigned)B, 128, 0, stream_h>>>(
        reinterpret_cast<const double*>(grad_loss), reinterpret_cast<const double*>(emb), D, k2, rs, sp, sc, cl, iv,
        reinterpret_cast<double*>(grad_emb));
  } else {
    dispatch_dev_float((DType)dtype, [&](auto tag) {
      using T = decltype(tag);
      backward_kernel<T, float><<<(unsigned)B, 128, 0, stream_h>>>(
          reinterpret_cast<const float*>(grad_loss), reinterpret_cast<const T*>(emb), D, k2, rs, sp, sc, cl, iv,
          reinterpret_cast<T*>(grad_emb));
    });
  }
  MK_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mk
