// Row-sparse optimizer steps, CPU: torch.optim.SGD / torch.optim.AdamW applied to the given
// rows only (each row behaves as its own parameter with its own state). Element math in
// torch's order of operations, in double for float64 tensors and in float32 otherwise
// (16-bit tensors are read/written through float32), as torch.optim computes them.
#include <cmath>

#include "checks.h"
#include "ops/sparse_optim.h"

namespace mk {
namespace cpu {

namespace {
template <typename T>
inline acc_t<T> ld(const T* p, int64_t i) { return (acc_t<T>)HostIO<T>::load(p, i); }
template <typename T>
inline void st(T* p, int64_t i, acc_t<T> v) { HostIO<T>::store(p, i, (double)v); }

template <typename T>
void sgd(T* w, const T* g, T* buf, uint8_t* init, const int64_t* rows, int64_t R, int64_t D, double lr_d,
         double momentum_d, double wd_d, double dampening_d, bool nesterov) {
  using A = acc_t<T>;
  const A lr = (A)lr_d, momentum = (A)momentum_d, wd = (A)wd_d, one_m_damp = (A)(1.0 - dampening_d);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = rows[r];
    const bool first = init != nullptr && init[row] == 0;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t wi = row * D + d;
      const A p = ld(w, wi);
      A dp = ld(g, r * D + d);
      if (wd != 0) dp = dp + wd * p;
      if (momentum != 0) {
        A b;
        if (first) b = dp;
        else b = ld(buf, wi) * momentum + one_m_damp * dp;
        st(buf, wi, b);
        b = ld(buf, wi);  // as stored (matters for 16-bit buffers)
        dp = nesterov ? dp + momentum * b : b;
      }
      st(w, wi, p + (-lr) * dp);
    }
    if (init != nullptr && momentum != 0) init[row] = 1;
  }
}

template <typename T>
void adamw(T* w, const T* g, T* m1, T* m2, int64_t* step, const int64_t* rows, int64_t R, int64_t D,
           double lr, double b1, double b2, double eps, double wd) {
  using A = acc_t<T>;
  const A decay = (A)(1.0 - lr * wd);
  const A wgt = (A)(1.0 - b1);
  const A b2a = (A)b2, omb2 = (A)(1.0 - b2), epsa = (A)eps;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = rows[r];
    const int64_t t = step[row] + 1;
    step[row] = t;
    const double bc1 = 1.0 - std::pow(b1, (double)t);
    const double bc2 = 1.0 - std::pow(b2, (double)t);
    const A neg_step_size = (A)(-(lr / bc1));
    const A bc2_sqrt = (A)std::pow(bc2, 0.5);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t wi = row * D + d;
      const A gr = ld(g, r * D + d);
      const A p = ld(w, wi) * decay;
      A a = ld(m1, wi);
      // torch.lerp: weight < 0.5 ? a + w*(g-a) : g - (g-a)*(1-w)
      a = wgt < (A)0.5 ? a + wgt * (gr - a) : gr - (gr - a) * ((A)1 - wgt);
      A v = ld(m2, wi) * b2a;
      v = v + omb2 * gr * gr;  // torch.addcmul: self + value * t1 * t2
      st(m1, wi, a);
      st(m2, wi, v);
      a = ld(m1, wi);
      v = ld(m2, wi);
      const A denom = std::sqrt(v) / bc2_sqrt + epsa;
      st(w, wi, p + neg_step_size * a / denom);  // torch.addcdiv: self + value * t1 / t2
    }
  }
}

// Sizes, the dtype code and rows in [0, C), before anything is written.
DType check_rows_step(const char* fn, ptr_t weight, ptr_t grad, ptr_t rows, int64_t R, int64_t C, int64_t D,
                      int dtype) {
  const DType type = check_dtype(fn, "dtype", dtype);
  check_size(fn, "R", R);
  check_size(fn, "C", C);
  check_size(fn, "D", D);
  check_product(fn, "C * D", C, D);
  check_product(fn, "R * D", R, D);
  if (R > 0) {
    check_ptrs(fn, {{"weight", weight}, {"grad", grad}, {"rows", rows}});
    check_indices(fn, "rows", reinterpret_cast<const int64_t*>(rows), R, 0, C);
  }
  return type;
}
}  // namespace

void sparse_sgd_step(MK_PARAMS(MK_SPARSE_SGD_STEP_ARGS)) {
  const DType type = check_rows_step("sparse_sgd_step", weight, grad, rows, R, C, D, dtype);
  if (R == 0 || D == 0) return;
  if (momentum != 0.0) check_ptr("sparse_sgd_step", "momentum_buffer", momentum_buffer);
  dispatch_host_float(type, [&](auto tag) {
    using T = decltype(tag);
    sgd<T>(reinterpret_cast<T*>(weight), reinterpret_cast<const T*>(grad),
           reinterpret_cast<T*>(momentum_buffer), reinterpret_cast<uint8_t*>(initialized),
           reinterpret_cast<const int64_t*>(rows), R, D, lr, momentum, weight_decay, dampening, nesterov);
  });
}

void sparse_adamw_step(MK_PARAMS(MK_SPARSE_ADAMW_STEP_ARGS)) {
  constexpr const char* fn = "sparse_adamw_step";
  const DType type = check_rows_step(fn, weight, grad, rows, R, C, D, dtype);
  if (R == 0) return;
  check_ptrs(fn, {{"exp_avg", exp_avg}, {"exp_avg_sq", exp_avg_sq}, {"step", step}});
  // A step count below 0 turns bias corrections into NaN; at the int64 limit it cannot be incremented.
  const int64_t* rs = reinterpret_cast<const int64_t*>(rows);
  const int64_t* st = reinterpret_cast<const int64_t*>(step);
  for (int64_t r = 0; r < R; ++r)
    MK_CHECK(st[rs[r]] >= 0 && st[rs[r]] < std::numeric_limits<int64_t>::max(),
             std::string(fn) + ": step[" + str(rs[r]) + "] = " + str(st[rs[r]]) + " must be in [0, 2^63 - 1)");
  dispatch_host_float(type, [&](auto tag) {
    using T = decltype(tag);
    adamw<T>(reinterpret_cast<T*>(weight), reinterpret_cast<const T*>(grad), reinterpret_cast<T*>(exp_avg),
             reinterpret_cast<T*>(exp_avg_sq), reinterpret_cast<int64_t*>(step),
             reinterpret_cast<const int64_t*>(rows), R, D, lr, beta1, beta2, eps, weight_decay);
  });
}

}  // namespace cpu
}  // namespace mk
