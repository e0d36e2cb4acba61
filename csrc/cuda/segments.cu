// Label segments of a stably sorted label array (shared by the label-indexed CUDA ops).
#include "cuda/cuda_common.cuh"

namespace mk {
namespace cuda {

namespace {
constexpr int kSegThreads = 1024;

__global__ void __launch_bounds__(kSegThreads)
segments_kernel(const int64_t* __restrict__ sl, int64_t B, int64_t* __restrict__ seg_start,
                int64_t* __restrict__ seg_id, int64_t* __restrict__ num_seg) {
  __shared__ int64_t warp_incl[32];
  __shared__ int64_t carry;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < B; base += blockDim.x) {
    const int64_t p = base + tid;
    const int flag = (p < B) && (p == 0 || sl[p] != sl[p - 1]);
    const unsigned mask = __ballot_sync(0xffffffffu, flag);
    const int incl = __popc(mask & (lane == 31 ? 0xffffffffu : ((2u << lane) - 1u)));
    if (lane == 31) warp_incl[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int64_t v = lane < nw ? warp_incl[lane] : 0;
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
      }
      if (lane < nw) warp_incl[lane] = v;
    }
    __syncthreads();
    const int64_t before = carry + (warp > 0 ? warp_incl[warp - 1] : 0) + incl - flag;
    if (p < B) {
      if (flag) seg_start[before] = p;
      seg_id[p] = before + flag - 1;
    }
    __syncthreads();
    if (tid == 0) carry += warp_incl[nw - 1];
    __syncthreads();
  }
  if (tid == 0) {
    seg_start[carry] = B;
    *num_seg = carry;
  }
}
}  // namespace

void launch_segments(const int64_t* sl, int64_t B, int64_t* seg_start, int64_t* seg_id, int64_t* num_seg,
                     cudaStream_t stream) {
  segments_kernel<<<1, kSegThreads, 0, stream>>>(sl, B, seg_start, seg_id, num_seg);
  MK_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mk
