// Partial FC class sampling, CUDA (semantics: csrc/cpu/partial_fc_sample.cpp). Output is
// bit-identical to the CPU version for the same seed.
//  mark:   flags[c] = 1 for positive classes; count them (integer atomics); one host sync.
//  select: radix select (8 passes of 8 bits over the 64-bit keys of the non-positive classes,
//          keys recomputed on the fly) finds the m-th smallest key T; classes with key <= T are
//          flagged; a three-kernel exclusive scan turns flags into positions, writes the sorted
//          index and remaps the labels.
#include "cuda/cuda_common.cuh"
#include "ops/partial_fc_sample.h"

namespace mk {
namespace cuda {

namespace {
constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int kTile = kThreads * kItems;
constexpr int kGridCap = 1024;

struct RadixState {
  unsigned long long prefix;
  unsigned long long mask;
  long long rank;  // 0-based rank of the wanted key among those matching prefix/mask
};

__global__ void mark_kernel(const int64_t* __restrict__ labels, int64_t B, int64_t start, int64_t stop,
                            int32_t* __restrict__ flags) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const int64_t y = labels[i];
  if (y >= start && y < stop) flags[y - start] = 1;  // racing writers all write 1
}

__global__ void count_kernel(const int32_t* __restrict__ flags, int64_t n, unsigned long long* __restrict__ count) {
  __shared__ double red[32];
  double c = 0.0;  // exact for any count < 2^53
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    c += flags[i] != 0 ? 1.0 : 0.0;
  c = block_sum(c, red);
  if (threadIdx.x == 0 && c > 0.0) atomicAdd(count, (unsigned long long)c);
}

__global__ void radix_hist_kernel(const int32_t* __restrict__ flags, int64_t n, int64_t start, uint64_t salt,
                                  int shift, const RadixState* __restrict__ st, unsigned long long* __restrict__ hist) {
  __shared__ unsigned int h[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
  __syncthreads();
  const unsigned long long prefix = st->prefix, mask = st->mask;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < n; c += (int64_t)gridDim.x * blockDim.x) {
    if (flags[c]) continue;
    const uint64_t key = sample_key(salt, start + c);
    if ((key & mask) == prefix) atomicAdd(&h[(key >> shift) & 255u], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x)
    if (h[i]) atomicAdd(&hist[i], (unsigned long long)h[i]);
}

__global__ void radix_pick_kernel(int shift, RadixState* __restrict__ st, unsigned long long* __restrict__ hist) {
  if (threadIdx.x != 0) return;
  long long cum = 0;
  const long long rank = st->rank;
  for (int b = 0; b < 256; ++b) {
    const long long h = (long long)hist[b];
    if (cum + h > rank) {
      st->prefix |= (unsigned long long)b << shift;
      st->mask |= 255ull << shift;
      st->rank = rank - cum;
      break;
    }
    cum += h;
  }
  for (int b = 0; b < 256; ++b) hist[b] = 0;  // ready for the next pass
}

__global__ void radix_mark_kernel(int32_t* __restrict__ flags, int64_t n, int64_t start, uint64_t salt,
                                  const RadixState* __restrict__ st) {
  const unsigned long long thresh = st->prefix;
  for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < n; c += (int64_t)gridDim.x * blockDim.x)
    if (!flags[c] && sample_key(salt, start + c) <= thresh) flags[c] = 2;  // 2: drawn negative
}

__global__ void radix_init_kernel(RadixState* __restrict__ st, long long rank) {
  if (threadIdx.x == 0) { st->prefix = 0ull; st->mask = 0ull; st->rank = rank; }
}

// --- exclusive scan of (flags != 0) in tiles of kTile
__global__ void __launch_bounds__(kThreads)
tile_count_kernel(const int32_t* __restrict__ flags, int64_t n, int64_t* __restrict__ tile_sum) {
  __shared__ double red[32];
  const int64_t base = (int64_t)blockIdx.x * kTile;
  double c = 0.0;
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + (int64_t)it * kThreads + threadIdx.x;
    if (i < n && flags[i]) c += 1.0;
  }
  c = block_sum(c, red);
  if (threadIdx.x == 0) tile_sum[blockIdx.x] = (int64_t)c;
}

// In-place exclusive scan of v[0, m) by one block (blockDim.x = 1024).
__global__ void __launch_bounds__(1024) scan_tiles_kernel(int64_t* __restrict__ v, int64_t m) {
  __shared__ int64_t warp_tot[32];
  __shared__ int64_t carry;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < m; base += blockDim.x) {
    const int64_t i = base + tid;
    const int64_t x = i < m ? v[i] : 0;
    int64_t incl = x;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int64_t w = lane < nw ? warp_tot[lane] : 0;
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t t = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += t;
      }
      if (lane < nw) warp_tot[lane] = w;
    }
    __syncthreads();
    const int64_t excl = carry + (warp > 0 ? warp_tot[warp - 1] : 0) + incl - x;
    if (i < m) v[i] = excl;
    __syncthreads();
    if (tid == 0) carry += warp_tot[nw - 1];
    __syncthreads();
  }
}

// flags -> position in index (or -1); index[position] = c.
__global__ void __launch_bounds__(kThreads)
tile_emit_kernel(int32_t* __restrict__ flags, int64_t n, const int64_t* __restrict__ tile_offset,
                 int64_t* __restrict__ index) {
  __shared__ int64_t warp_tot[kThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t base = (int64_t)blockIdx.x * kTile + (int64_t)tid * kItems;  // kItems consecutive per thread
  int f[kItems];
  int64_t mine = 0;
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + it;
    f[it] = (i < n && flags[i]) ? 1 : 0;
    mine += f[it];
  }
  int64_t incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  int64_t before_warp = 0;
  for (int w = 0; w < warp; ++w) before_warp += warp_tot[w];
  int64_t pos = tile_offset[blockIdx.x] + before_warp + incl - mine;
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + it;
    if (i >= n) break;
    if (f[it]) {
      index[pos] = i;
      flags[i] = (int32_t)pos;
      ++pos;
    } else {
      flags[i] = -1;
    }
  }
}

__global__ void local_labels_kernel(const int64_t* __restrict__ labels, int64_t B, int64_t start, int64_t stop,
                                    const int32_t* __restrict__ pos, int64_t* __restrict__ local) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const int64_t y = labels[i];
  local[i] = (y >= start && y < stop) ? (int64_t)pos[y - start] : -1;
}

struct Layout {
  unsigned long long* count;
  RadixState* st;
  unsigned long long* hist;
  int64_t* tiles;
};

Layout carve(ptr_t base, int64_t n, int64_t* bytes) {
  Carver cv(base);
  Layout l;
  l.count = cv.take<unsigned long long>(1);
  l.st = cv.take<RadixState>(1);
  l.hist = cv.take<unsigned long long>(256);
  l.tiles = cv.take<int64_t>((n + kTile - 1) / kTile + 1);
  if (bytes) *bytes = cv.bytes();
  return l;
}

inline unsigned grid_for(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(g, kGridCap));
}
}  // namespace

// 0 <= start <= stop, n = stop - start < 2^31 (int32 positions), B >= 0.
static void check_shard(const char* fn, int64_t start, int64_t stop, int64_t B) {
  MK_CHECK(start >= 0, std::string(fn) + ": start = " + str(start) + " must be >= 0");
  MK_CHECK(stop >= start, std::string(fn) + ": stop = " + str(stop) + " must be >= start = " + str(start));
  MK_CHECK(stop - start < (int64_t(1) << 31), std::string(fn) + ": stop - start = " + str(stop - start) + " must be < 2^31");
  check_size(fn, "B", B);
}

int64_t partial_fc_workspace_bytes(int64_t n) {
  MK_CHECK(n >= 0 && n < (int64_t(1) << 31), "partial_fc_workspace_bytes: n = " + str(n) + " must be in [0, 2^31)");
  int64_t bytes = 0;
  carve(0, n, &bytes);
  return bytes;
}

int64_t partial_fc_mark(MK_PARAMS(MK_PARTIAL_FC_MARK_CUDA_ARGS)) {
  check_shard("partial_fc_mark", start, stop, B);
  const int64_t n = stop - start;
  if (n <= 0) return 0;
  check_ptrs("partial_fc_mark", {{"flags", flags}, {"workspace", workspace}});
  if (B > 0) check_ptr("partial_fc_mark", "labels", labels);
  const ptr_t flags_p = flags, stream_p = stream;
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream_p);
  Layout l = carve(workspace, n, nullptr);
  int32_t* flg = reinterpret_cast<int32_t*>(flags_p);
  MK_CUDA_CHECK(cudaMemsetAsync(flg, 0, (size_t)n * sizeof(int32_t), stream_h));
  MK_CUDA_CHECK(cudaMemsetAsync(l.count, 0, sizeof(unsigned long long), stream_h));
  if (B > 0) {
    mark_kernel<<<ceil_div_u(B, kThreads), kThreads, 0, stream_h>>>(reinterpret_cast<const int64_t*>(labels), B,
                                                                   start, stop, flg);
    MK_CUDA_CHECK_LAUNCH();
  }
  count_kernel<<<grid_for(n, kThreads), kThreads, 0, stream_h>>>(flg, n, l.count);
  MK_CUDA_CHECK_LAUNCH();
  unsigned long long P = 0;
  MK_CUDA_CHECK(cudaMemcpyAsync(&P, l.count, sizeof(P), cudaMemcpyDeviceToHost, stream_h));
  MK_CUDA_CHECK(cudaStreamSynchronize(stream_h));
  return (int64_t)P;
}

void partial_fc_select(MK_PARAMS(MK_PARTIAL_FC_SELECT_CUDA_ARGS)) {
  constexpr const char* fn = "partial_fc_select";
  check_shard(fn, start, stop, B);
  check_size(fn, "m", m);
  check_size(fn, "num_index", num_index);
  const int64_t n = stop - start;
  // The flag count lives on the device: the host checks what it can without a sync.
  MK_CHECK(m <= n && num_index >= m && num_index <= n,
           std::string(fn) + ": need m <= num_index <= n, got m = " + str(m) + ", num_index = " + str(num_index) +
               ", n = " + str(n));
  if (n > 0) check_ptrs(fn, {{"flags", flags}, {"workspace", workspace}});
  if (B > 0) check_ptrs(fn, {{"labels", labels}, {"local_labels", local_labels}});
  if (num_index > 0) check_ptr(fn, "index", index);
  const ptr_t flags_p = flags, stream_p = stream;
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream_p);
  int32_t* flg = reinterpret_cast<int32_t*>(flags_p);
  if (n > 0) {
    Layout l = carve(workspace, n, nullptr);
    const uint64_t salt = seed_salt(seed);
    if (m > 0) {
      // Number of candidates is n - P; the wrapper passes m <= n - P.
      radix_init_kernel<<<1, 32, 0, stream_h>>>(l.st, (long long)(m - 1));
      MK_CUDA_CHECK_LAUNCH();
      MK_CUDA_CHECK(cudaMemsetAsync(l.hist, 0, 256 * sizeof(unsigned long long), stream_h));
      for (int shift = 56; shift >= 0; shift -= 8) {
        radix_hist_kernel<<<grid_for(n, kThreads), kThreads, 0, stream_h>>>(flg, n, start, salt, shift, l.st, l.hist);
        MK_CUDA_CHECK_LAUNCH();
        radix_pick_kernel<<<1, 32, 0, stream_h>>>(shift, l.st, l.hist);
        MK_CUDA_CHECK_LAUNCH();
      }
      // If m == n - P the threshold is the largest key and every candidate is taken.
      radix_mark_kernel<<<grid_for(n, kThreads), kThreads, 0, stream_h>>>(flg, n, start, salt, l.st);
      MK_CUDA_CHECK_LAUNCH();
    }
    const int64_t tiles = (n + kTile - 1) / kTile;
    tile_count_kernel<<<(unsigned)tiles, kThreads, 0, stream_h>>>(flg, n, l.tiles);
    MK_CUDA_CHECK_LAUNCH();
    scan_tiles_kernel<<<1, 1024, 0, stream_h>>>(l.tiles, tiles);
    MK_CUDA_CHECK_LAUNCH();
    tile_emit_kernel<<<(unsigned)tiles, kThreads, 0, stream_h>>>(flg, n, l.tiles, reinterpret_cast<int64_t*>(index));
    MK_CUDA_CHECK_LAUNCH();
  }
  if (B > 0) {
    if (n > 0) {
      local_labels_kernel<<<ceil_div_u(B, kThreads), kThreads, 0, stream_h>>>(
          reinterpret_cast<const int64_t*>(labels), B, start, stop, flg, reinterpret_cast<int64_t*>(local_labels));
    } else {
      MK_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(local_labels), 0xFF, (size_t)B * sizeof(int64_t), stream_h));
    }
    MK_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace cuda
}  // namespace mk
