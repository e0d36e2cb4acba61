// Helpers shared by the CUDA kernels (nvcc only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "checks.h"
#include "signature.h"

namespace mk {
namespace cuda {

[[noreturn]] inline void cuda_fail(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("marginkit._C CUDA error in ") + what + " (" + file + ":" +
                           std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

#define MK_CUDA_CHECK(expr)                                                  \
  do {                                                                       \
    cudaError_t _mk_err = (expr);                                            \
    if (_mk_err != cudaSuccess) ::mk::cuda::cuda_fail(_mk_err, #expr, __FILE__, __LINE__); \
  } while (0)

// After kernel launches: launch-configuration errors become exceptions.
#define MK_CUDA_CHECK_LAUNCH() MK_CUDA_CHECK(cudaGetLastError())

// marginkit._C links cudart statically, so its notion of "current device" is
// its own, not torch's: every entry point selects the tensors' device
// explicitly and restores the previous one on exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MK_CUDA_CHECK(cudaGetDevice(&prev_));
    if (device != prev_) MK_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Element load/store as float on the device.
template <typename T> struct DevIO;
template <> struct DevIO<float> {
  static __device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct DevIO<__half> {
  static __device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <> struct DevIO<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

template <> struct DevIO<double> {
  static __device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(double* p, int64_t i, float v) { p[i] = (double)v; }
  static __device__ __forceinline__ void store(double* p, int64_t i, double v) { p[i] = v; }
};

// Calls f(T{}) with T the device storage type of `t` (float, __half, __nv_bfloat16, double).
template <typename F>
inline void dispatch_dev_float(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(__half{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
    case DType::f64: f(double{}); return;
  }
  fail("unsupported dtype code " + std::to_string((int)t) +
       " (allowed: 0 float32, 1 float16, 2 bfloat16, 3 float64)");
}

// Carves typed, 256-byte aligned arrays out of one scratch buffer. With base == nullptr it
// only measures: bytes() is what the buffer must hold (used by *_workspace_bytes).
class Carver {
 public:
  explicit Carver(ptr_t base) : base_(base) {}
  template <typename T>
  T* take(int64_t n) {
    off_ = (off_ + 255) & ~(uint64_t)255;
    T* out = reinterpret_cast<T*>(base_ + off_);
    off_ += (uint64_t)(n > 0 ? n : 0) * sizeof(T);
    return out;
  }
  int64_t bytes() const { return (int64_t)off_ + 256; }

 private:
  ptr_t base_;
  uint64_t off_ = 0;
};

// Label segments of a stably sorted label array sl[0, B): seg_start[0..G] (seg_start[G] = B),
// seg_id[p] for every position, *num_seg = G. One block; deterministic. (segments.cu)
void launch_segments(const int64_t* sl, int64_t B, int64_t* seg_start, int64_t* seg_id, int64_t* num_seg,
                     cudaStream_t stream);

inline unsigned int ceil_div_u(int64_t a, int64_t b) { return (unsigned int)((a + b - 1) / b); }

// Block-wide sum of a double (blockDim.x a multiple of 32, <= 1024). All threads get the result.
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline double block_sum(double v, double* smem32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem32 may still be read by a previous call
  if (lane == 0) smem32[warp] = v;
  __syncthreads();
  double t = 0.0;
  if (warp == 0) {
    t = lane < nw ? smem32[lane] : 0.0;
    t = warp_sum(t);
    if (lane == 0) smem32[0] = t;
  }
  __syncthreads();
  return smem32[0];
}

}  // namespace cuda
}  // namespace mk
