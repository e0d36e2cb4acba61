// Per-class statistics for adaptive margins, CPU. For each row i with label c != ignore_index,
// with x^ = x_i / max(||x_i||, 1e-12) and w^ = W_c / max(||W_c||, 1e-12):
//   counts[c] += 1;  cos_sum[c] += x^ . w^;  sq_sum[c] += ||x^ - w^||^2
// Rows in stable label-sorted order, float64 sums: deterministic.
#include <algorithm>
#include <cmath>

#include "checks.h"
#include "cpu/segments.h"
#include "ops/class_statistics_update.h"

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

void class_statistics_update(MK_PARAMS(MK_CLASS_STATISTICS_UPDATE_ARGS)) {
  constexpr const char* fn = "class_statistics_update";
  check_size(fn, "C", C);
  check_size(fn, "D", D);
  check_size(fn, "B", B);
  check_product(fn, "C * D", C, D);
  check_product(fn, "B * D", B, D);
  const DType xtype = check_dtype(fn, "emb_dtype", emb_dtype);
  const DType wtype = check_dtype(fn, "w_dtype", w_dtype);
  if (B == 0) return;
  check_ptrs(fn, {{"counts", counts}, {"cos_sum", cos_sum}, {"sq_sum", sq_sum}, {"emb", emb},
                         {"weight", weight}, {"sorted_labels", sorted_labels}, {"order", order}});
  const int64_t* sl = reinterpret_cast<const int64_t*>(sorted_labels);
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  int64_t* cnt = reinterpret_cast<int64_t*>(counts);
  check_labels(fn, sl, B, C, ignore_index);
  check_indices(fn, "order", ord, B, 0, B);
  // Before any write: no count may overflow (a failed call leaves every buffer as it was).
  for_each_segment(sl, B, [&](int64_t, int64_t p0, int64_t p1) {
    const int64_t c = sl[p0];
    if (c == ignore_index) return;
    MK_CHECK(cnt[c] >= 0 && cnt[c] <= std::numeric_limits<int64_t>::max() - (p1 - p0),
             std::string(fn) + ": counts[" + str(c) + "] = " + str(cnt[c]) + " is negative or would overflow int64");
  });
  dispatch_host_float(xtype, [&](auto xtag) {
    using TX = decltype(xtag);
    dispatch_host_float(wtype, [&](auto wtag) {
      using TW = decltype(wtag);
      run<TX, TW>(cnt, reinterpret_cast<double*>(cos_sum), reinterpret_cast<double*>(sq_sum),
                  reinterpret_cast<const TX*>(emb), reinterpret_cast<const TW*>(weight), B, D, sl, ord, ignore_index);
    });
  });
}

}  // namespace cpu
}  // namespace mk
