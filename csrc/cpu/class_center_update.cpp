// IR-Softmax class-center running update, CPU.
// For each class c present in the batch (label != ignore_index):
//   centers[c] <- normalize(momentum * centers[c] + (1 - momentum) * mean_{i: y_i = c} normalize(x_i))
// Rows are visited in stable label-sorted order; sums in float64.
#include <cmath>
#include <vector>

#include "cpu/segments.h"
#include "ops.h"

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

void class_center_update(ptr_t centers, int64_t C, int64_t D, ptr_t emb, int emb_dtype, int64_t B,
                         ptr_t sorted_labels, ptr_t order, double momentum, int64_t ignore_index) {
  if (B == 0 || D == 0) return;
  dispatch_host_float((DType)emb_dtype, [&](auto tag) {
    using T = decltype(tag);
    run<T>(reinterpret_cast<float*>(centers), D, reinterpret_cast<const T*>(emb), B,
           reinterpret_cast<const int64_t*>(sorted_labels), reinterpret_cast<const int64_t*>(order),
           momentum, ignore_index);
  });
}

}  // namespace cpu
}  // namespace mk
