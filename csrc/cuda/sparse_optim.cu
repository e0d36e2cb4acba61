// Row-sparse SGD / AdamW steps, CUDA (semantics: csrc/cpu/sparse_optim.cpp). One block per
// selected row (rows are distinct, so blocks never share memory); per-row state (the SGD
// "initialized" flag, the AdamW step count) is read by the update kernel and written by a
// second kernel, so no block reads a value another block is writing.
#include "cuda/cuda_common.cuh"
#include "ops/sparse_optim.h"

namespace mk {
namespace cuda {

namespace {
constexpr int kThreads = 128;

// Round-to-nearest arithmetic that nvcc may not contract into FMAs (the CPU path has none).
template <typename A> struct RN;
template <> struct RN<float> {
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
  static __device__ __forceinline__ float sqrt(float a) { return __fsqrt_rn(a); }
};
template <> struct RN<double> {
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
  static __device__ __forceinline__ double sqrt(double a) { return __dsqrt_rn(a); }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
sgd_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ buf, const uint8_t* __restrict__ init,
           const int64_t* __restrict__ rows, int64_t D, double lr_d, double momentum_d, double wd_d,
           double dampening_d, bool nesterov) {
  using A = acc_t<T>;
  using M = RN<A>;
  const A lr = (A)lr_d, momentum = (A)momentum_d, wd = (A)wd_d, one_m_damp = (A)(1.0 - dampening_d);
  const int64_t r = blockIdx.x;
  const int64_t row = rows[r];
  const bool first = init != nullptr && init[row] == 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const int64_t wi = row * D + d;
    const A p = (A)DevIO<T>::load(w, wi);
    A dp = (A)DevIO<T>::load(g, r * D + d);
    if (wd != 0) dp = M::add(dp, M::mul(wd, p));
    if (momentum != 0) {
      A b = first ? dp : M::add(M::mul((A)DevIO<T>::load(buf, wi), momentum), M::mul(one_m_damp, dp));
      DevIO<T>::store(buf, wi, b);
      b = (A)DevIO<T>::load(buf, wi);
      dp = nesterov ? M::add(dp, M::mul(momentum, b)) : b;
    }
    DevIO<T>::store(w, wi, M::add(p, M::mul(-lr, dp)));
  }
}

__global__ void set_flags_kernel(uint8_t* __restrict__ init, const int64_t* __restrict__ rows, int64_t R) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r < R) init[rows[r]] = 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
adamw_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m1, T* __restrict__ m2,
             const int64_t* __restrict__ step, const int64_t* __restrict__ rows, int64_t D, double lr, double b1,
             double b2, double eps, double wd) {
  using A = acc_t<T>;
  using M = RN<A>;
  __shared__ A s_step_size, s_bc2_sqrt;
  const int64_t r = blockIdx.x;
  const int64_t row = rows[r];
  if (threadIdx.x == 0) {
    const double t = (double)(step[row] + 1);
    const double bc1 = 1.0 - pow(b1, t);
    const double bc2 = 1.0 - pow(b2, t);
    s_step_size = (A)(-(lr / bc1));
    s_bc2_sqrt = (A)pow(bc2, 0.5);
  }
  __syncthreads();
  const A decay = (A)__dsub_rn(1.0, __dmul_rn(lr, wd)), wgt = (A)(1.0 - b1), b2a = (A)b2, omb2 = (A)(1.0 - b2),
          epsa = (A)eps, neg_step = s_step_size, bc2s = s_bc2_sqrt;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const int64_t wi = row * D + d;
    const A gr = (A)DevIO<T>::load(g, r * D + d);
    const A p = M::mul((A)DevIO<T>::load(w, wi), decay);
    A a = (A)DevIO<T>::load(m1, wi);
    a = wgt < (A)0.5 ? M::add(a, M::mul(wgt, M::sub(gr, a))) : M::sub(gr, M::mul(M::sub(gr, a), (A)1 - wgt));
    A v = M::mul((A)DevIO<T>::load(m2, wi), b2a);
    v = M::add(v, M::mul(M::mul(omb2, gr), gr));
    DevIO<T>::store(m1, wi, a);
    DevIO<T>::store(m2, wi, v);
    a = (A)DevIO<T>::load(m1, wi);
    v = (A)DevIO<T>::load(m2, wi);
    const A denom = M::add(M::div(M::sqrt(v), bc2s), epsa);
    DevIO<T>::store(w, wi, M::add(p, M::div(M::mul(neg_step, a), denom)));
  }
}

__global__ void bump_steps_kernel(int64_t* __restrict__ step, const int64_t* __restrict__ rows, int64_t R) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r < R) step[rows[r]] += 1;
}
}  // namespace

// Sizes and the dtype code (rows live on the device: the Python side checks them).
static void check_step_sizes(const char* fn, int64_t R, int64_t C, int64_t D, int dtype) {
  check_dtype(fn, "dtype", dtype);
  check_size(fn, "R", R);
  check_size(fn, "C", C);
  check_size(fn, "D", D);
  check_product(fn, "C * D", C, D);
  check_product(fn, "R * D", R, D);
}

void sparse_sgd_step(MK_PARAMS(MK_SPARSE_SGD_STEP_CUDA_ARGS)) {
  check_step_sizes("sparse_sgd_step", R, C, D, dtype);
  if (R == 0 || D == 0) return;
  check_ptrs("sparse_sgd_step", {{"weight", weight}, {"grad", grad}, {"rows", rows}});
  const ptr_t stream_p = stream;
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream_p);
  const int64_t* rs = reinterpret_cast<const int64_t*>(rows);
  uint8_t* init = reinterpret_cast<uint8_t*>(initialized);
  dispatch_dev_float((DType)dtype, [&](auto tag) {
    using T = decltype(tag);
    sgd_kernel<T><<<(unsigned)R, kThreads, 0, stream_h>>>(
        reinterpret_cast<T*>(weight), reinterpret_cast<const T*>(grad), reinterpret_cast<T*>(momentum_buffer), init,
        rs, D, lr, momentum, weight_decay, dampening, nesterov);
    MK_CUDA_CHECK_LAUNCH();
  });
  if (init != nullptr && momentum != 0.0) {
    set_flags_kernel<<<ceil_div_u(R, 256), 256, 0, stream_h>>>(init, rs, R);
    MK_CUDA_CHECK_LAUNCH();
  }
}

void sparse_adamw_step(MK_PARAMS(MK_SPARSE_ADAMW_STEP_CUDA_ARGS)) {
  check_step_sizes("sparse_adamw_step", R, C, D, dtype);
  if (R == 0) return;
  check_ptrs("sparse_adamw_step", {{"weight", weight}, {"grad", grad}, {"exp_avg", exp_avg},
                                   {"exp_avg_sq", exp_avg_sq}, {"step", step}, {"rows", rows}});
  const ptr_t stream_p = stream;
  DeviceGuard guard(device);
  cudaStream_t stream_h = as_stream(stream_p);
  const int64_t* rs = reinterpret_cast<const int64_t*>(rows);
  int64_t* st = reinterpret_cast<int64_t*>(step);
  if (D > 0) {
    dispatch_dev_float((DType)dtype, [&](auto tag) {
      using T = decltype(tag);
      adamw_kernel<T><<<(unsigned)R, kThreads, 0, stream_h>>>(
          reinterpret_cast<T*>(weight), reinterpret_cast<const T*>(grad), reinterpret_cast<T*>(exp_avg),
          reinterpret_cast<T*>(exp_avg_sq), st, rs, D, lr, beta1, beta2, eps, weight_decay);
      MK_CUDA_CHECK_LAUNCH();
    });
  }
  bump_steps_kernel<<<ceil_div_u(R, 256), 256, 0, stream_h>>>(st, rs, R);
  MK_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mk
