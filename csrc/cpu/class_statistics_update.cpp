// Per-class statistics for adaptive margins, CPU. For each row i with label c != ignore_index,
// with x^ = x_i / max(||x_i||, 1e-12) and w^ = W_c / max(||W_c||, 1e-12):
//   counts[c] += 1;  cos_sum[c] += x^ . w^;  sq_sum[c] += ||x^ - w^||^2
// Rows in stable label-sorted order, float64 sums: deterministic.
#include <algorithm>
#include <cmath>

#include "cpu/segments.h"
#include "ops.h"

namespace mk {
namespace cpu {

namespace {
template <typename TX, typename TW>
void run(int64_t* counts, double* cos_sum, double* sq_sum, const TX* x, const TW* w, int64_t B,
         int64_t D, const int64_t* sl, const int64_t* order, int64_t ignore_index) {
  for_each_segment(sl, B, [&](int64_t, int64_t p0, int64_t p1) {
    const int64_t c = sl[p0];
    if (c == ignore_index) return;
    const int64_t wrow = c * D;
    double ww = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = HostIO<TW>::load(w, wrow + d);
      ww += v * v;
    }
    const double iw = 1.0 / std::max(std::sqrt(ww), kNormEps);
    double cs = 0.0, sq = 0.0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t xrow = order[p] * D;
      double xx = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = HostIO<TX>::load(x, xrow + d);
        xx += v * v;
      }
      const double ix = 1.0 / std::max(std::sqrt(xx), kNormEps);
      double dot = 0.0, dist = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double a = HostIO<TX>::load(x, xrow + d) * ix;
        const double b = HostIO<TW>::load(w, wrow + d) * iw;
        dot += a * b;
        dist += (a - b) * (a - b);
      }
      cs += dot;
      sq += dist;
    }
    counts[c] += p1 - p0;
    cos_sum[c] += cs;
    sq_sum[c] += sq;
  });
}
}  // namespace

void class_statistics_update(ptr_t counts, ptr_t cos_sum, ptr_t sq_sum, int64_t C, ptr_t emb,
                             int emb_dtype, ptr_t weight, int w_dtype, int64_t B, int64_t D,
                             ptr_t sorted_labels, ptr_t order, int64_t ignore_index) {
  if (B == 0) return;
  dispatch_host_float((DType)emb_dtype, [&](auto xtag) {
    using TX = decltype(xtag);
    dispatch_host_float((DType)w_dtype, [&](auto wtag) {
      using TW = decltype(wtag);
      run<TX, TW>(reinterpret_cast<int64_t*>(counts), reinterpret_cast<double*>(cos_sum),
                  reinterpret_cast<double*>(sq_sum), reinterpret_cast<const TX*>(emb),
                  reinterpret_cast<const TW*>(weight), B, D,
                  reinterpret_cast<const int64_t*>(sorted_labels),
                  reinterpret_cast<const int64_t*>(order), ignore_index);
    });
  });
}

}  // namespace cpu
}  // namespace mk
