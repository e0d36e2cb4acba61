// IR-Softmax class-center running update, CPU.
// For each class c present in the batch (label != ignore_index):
//   centers[c] <- normalize(momentum * centers[c] + (1 - momentum) * mean_{i: y_i = c} normalize(x_i))
// Rows are visited in stable label-sorted order; sums in float64.
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/segments.h"
#include "ops/class_center_update.h"

namespace mk {
namespace cpu {

namespace {
template <typename T>
void run(float* centers, int64_t D, const T* x, int64_t B, const int64_t* sl, const int64_t* order,
         double momentum, int64_t ignore_index) {
  std::vector<double> acc((size_t)D);
  for_each_segment(sl, B, [&](int64_t, int64_t p0, int64_t p1) {
    const int64_t c = sl[p0];
    if (c == ignore_index) return;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t row = order[p] * D;
      double ss = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = HostIO<T>::load(x, row + d);
        ss += v * v;
      }
      const double inv = 1.0 / std::max(std::sqrt(ss), kNormEps);
      for (int64_t d = 0; d < D; ++d) acc[(size_t)d] += HostIO<T>::load(x, row + d) * inv;
    }
    const double w_new = (1.0 - momentum) / (double)(p1 - p0);
    float* ctr = centers + c * D;
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = momentum * (double)ctr[d] + w_new * acc[(size_t)d];
      acc[(size_t)d] = v;
      ss += v * v;
    }
    const double inv = 1.0 / std::max(std::sqrt(ss), kNormEps);
    for (int64_t d = 0; d < D; ++d) ctr[d] = (float)(acc[(size_t)d] * inv);
  });
}
}  // namespace

void class_center_update(MK_PARAMS(MK_CLASS_CENTER_UPDATE_ARGS)) {
  constexpr const char* fn = "class_center_update";
  check_size(fn, "C", C);
  check_size(fn, "D", D);
  check_size(fn, "B", B);
  check_product(fn, "C * D", C, D);
  check_product(fn, "B * D", B, D);
  const DType dtype = check_dtype(fn, "emb_dtype", emb_dtype);
  if (B == 0 || D == 0) return;
  check_ptrs(fn, {{"centers", centers}, {"emb", emb}, {"sorted_labels", sorted_labels}, {"order", order}});
  const int64_t* sl = reinterpret_cast<const int64_t*>(sorted_labels);
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  check_labels(fn, sl, B, C, ignore_index);
  check_indices(fn, "order", ord, B, 0, B);
  dispatch_host_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    run<T>(reinterpret_cast<float*>(centers), D, reinterpret_cast<const T*>(emb), B, sl, ord, momentum,
           ignore_index);
  });
}

}  // namespace cpu
}  // namespace mk
