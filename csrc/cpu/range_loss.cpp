// Range loss (Zhang et al., 2017) forward and backward, CPU. See ops/range_loss.h for the saved outputs.
//
// d(a, b) = ||x_a - x_b||^2 (rows as given, float64 sums, computed as sum of squared
// differences). Per class with n >= 2 rows: the k' = min(k, n(n-1)/2) largest pairwise
// distances d_1..d_k' (ties: the pair with the lower row indices first), and
//   intra_c = k' / sum_j 1/d_j.
// Guard: if a selected d_j is exactly 0 (identical rows), intra_c is taken as its limit 0 and
// that class contributes no gradient (the gradient of d_j at 0 is 0 anyway), so no inf/NaN.
// Class means x_c; inter = max(margin - min_{Q<R} ||x_Q - x_R||^2, 0) (0 with < 2 classes;
// ties between equally close pairs: the first in label order). loss = alpha*intra + beta*inter.
#include <algorithm>
#include <cmath>
#include <queue>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/segments.h"
#include "ops/range_loss.h"

namespace mk {
namespace cpu {

namespace {
struct Cand {
  double d;
  int64_t key;  // i * n + j, positions inside the segment
};
// "a ranks before b" among the largest distances.
inline bool better(const Cand& a, const Cand& b) { return a.d > b.d || (a.d == b.d && a.key < b.key); }

template <typename T>
void forward(const T* x, int64_t B, int64_t D, const int64_t* sl, const int64_t* order, int64_t k2,
             double margin, double alpha, double beta, void* loss, int64_t* row_seg, int64_t* sel,
             double* coef, int64_t* closest, double* inter_vec) {
  std::fill(sel, sel + B * k2 * 2, (int64_t)-1);
  std::fill(coef, coef + B * k2, 0.0);
  std::fill(inter_vec, inter_vec + D, 0.0);
  closest[0] = closest[1] = -1;
  closest[2] = closest[3] = 0;

  std::vector<int64_t> seg_begin, seg_end;
  for_each_segment(sl, B, [&](int64_t g, int64_t p0, int64_t p1) {
    seg_begin.push_back(p0);
    seg_end.push_back(p1);
    for (int64_t p = p0; p < p1; ++p) row_seg[order[p]] = g;
  });
  const int64_t G = (int64_t)seg_begin.size();

  auto dist = [&](int64_t ra, int64_t rb) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double t = HostIO<T>::load(x, ra * D + d) - HostIO<T>::load(x, rb * D + d);
      s += t * t;
    }
    return s;
  };

  double intra = 0.0;
  auto worse_on_top = [](const Cand& a, const Cand& b) { return better(a, b); };
  for (int64_t g = 0; g < G; ++g) {
    const int64_t p0 = seg_begin[(size_t)g], n = seg_end[(size_t)g] - p0;
    if (n < 2) continue;
    std::priority_queue<Cand, std::vector<Cand>, decltype(worse_on_top)> heap(worse_on_top);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j) {
        Cand c{dist(order[p0 + i], order[p0 + j]), i * n + j};
        if ((int64_t)heap.size() < k2) heap.push(c);
        else if (better(c, heap.top())) { heap.pop(); heap.push(c); }
      }
    std::vector<Cand> top;
    while (!heap.empty()) { top.push_back(heap.top()); heap.pop(); }
    std::sort(top.begin(), top.end(), better);
    const int64_t kk = (int64_t)top.size();
    double s_inv = 0.0;
    bool zero = false;
    for (const Cand& c : top) {
      if (!(c.d > 0.0)) zero = true;
      else s_inv += 1.0 / c.d;
    }
    for (int64_t j = 0; j < kk; ++j) {
      const int64_t i0 = top[(size_t)j].key / n, j0 = top[(size_t)j].key % n;
      sel[(g * k2 + j) * 2 + 0] = order[p0 + i0];
      sel[(g * k2 + j) * 2 + 1] = order[p0 + j0];
      if (!zero) {
        const double t = s_inv * top[(size_t)j].d;
        coef[g * k2 + j] = alpha * (double)kk / (t * t);
      }
    }
    if (!zero) intra += (double)kk / s_inv;
  }

  double inter = 0.0;
  if (G >= 2) {
    std::vector<double> means((size_t)(G * D), 0.0);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t p0 = seg_begin[(size_t)g], p1 = seg_end[(size_t)g];
      double* m = means.data() + g * D;
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t d = 0; d < D; ++d) m[d] += HostIO<T>::load(x, order[p] * D + d);
      for (int64_t d = 0; d < D; ++d) m[d] /= (double)(p1 - p0);
    }
    double best = INFINITY;
    int64_t bq = -1, br = -1;
    for (int64_t a = 0; a < G; ++a)
      for (int64_t b = a + 1; b < G; ++b) {
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double t = means[(size_t)(a * D + d)] - means[(size_t)(b * D + d)];
          s += t * t;
        }
        if (s < best) { best = s; bq = a; br = b; }
      }
    if (margin - best > 0.0) {
      inter = margin - best;
      closest[0] = bq;
      closest[1] = br;
      closest[2] = seg_end[(size_t)bq] - seg_begin[(size_t)bq];
      closest[3] = seg_end[(size_t)br] - seg_begin[(size_t)br];
      for (int64_t d = 0; d < D; ++d)
        inter_vec[d] = -2.0 * beta * (means[(size_t)(bq * D + d)] - means[(size_t)(br * D + d)]);
    }
  }
  const double total = alpha * intra + beta * inter;
  if (std::is_same<T, double>::value) *reinterpret_cast<double*>(loss) = total;
  else *reinterpret_cast<float*>(loss) = (float)total;
}

template <typename T>
void backward(double gout, const T* x, int64_t B, int64_t D, int64_t k2, const int64_t* row_seg,
              const int64_t* sel, const double* coef, const int64_t* closest, const double* inter_vec,
              T* gx) {
  std::vector<double> acc((size_t)D);
  for (int64_t r = 0; r < B; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const int64_t g = row_seg[r];
    for (int64_t j = 0; j < k2; ++j) {
      const int64_t a = sel[(g * k2 + j) * 2], b = sel[(g * k2 + j) * 2 + 1];
      if (a < 0) break;
      if (a != r && b != r) continue;
      const double c = 2.0 * coef[g * k2 + j] * (a == r ? 1.0 : -1.0);
      if (c == 0.0) continue;
      for (int64_t d = 0; d < D; ++d)
        acc[(size_t)d] += c * (HostIO<T>::load(x, a * D + d) - HostIO<T>::load(x, b * D + d));
    }
    if (g == closest[0])
      for (int64_t d = 0; d < D; ++d) acc[(size_t)d] += inter_vec[d] / (double)closest[2];
    if (g == closest[1])
      for (int64_t d = 0; d < D; ++d) acc[(size_t)d] -= inter_vec[d] / (double)closest[3];
    for (int64_t d = 0; d < D; ++d) HostIO<T>::store(gx, r * D + d, (double)gout * acc[(size_t)d]);
  }
}
}  // namespace

namespace {
// Sizes shared by forward and backward: the buffers (B, D), (B, k2, 2) and (B, k2) are addressable.
void check_range_sizes(const char* fn, int64_t B, int64_t D, int64_t k2) {
  check_size(fn, "B", B);
  check_size(fn, "D", D);
  MK_CHECK(k2 >= 1, std::string(fn) + ": k2 = " + str(k2) + " must be >= 1");
  check_product(fn, "B * D", B, D);
  check_product(fn, "B * k2 * 2", B, k2);
  check_product(fn, "B * k2 * 2", B * k2, 2);
}
}  // namespace

void range_loss_forward(MK_PARAMS(MK_RANGE_LOSS_FORWARD_ARGS)) {
  constexpr const char* fn = "range_loss_forward";
  const DType type = check_dtype(fn, "dtype", dtype);
  check_range_sizes(fn, B, D, k2);
  check_ptrs(fn, {{"loss", loss}, {"closest", closest}});
  if (B > 0)
    check_ptrs(fn, {{"emb", emb}, {"sorted_labels", sorted_labels}, {"order", order}, {"row_seg", row_seg},
                    {"sel_pairs", sel_pairs}, {"sel_coef", sel_coef}});
  if (D > 0) check_ptr(fn, "inter_vec", inter_vec);
  const int64_t* ord = reinterpret_cast<const int64_t*>(order);
  if (B > 0) check_indices(fn, "order", ord, B, 0, B);
  dispatch_host_float(type, [&](auto tag) {
    using T = decltype(tag);
    forward<T>(reinterpret_cast<const T*>(emb), B, D, reinterpret_cast<const int64_t*>(sorted_labels), ord, k2,
               margin, alpha, beta, reinterpret_cast<void*>(loss), reinterpret_cast<int64_t*>(row_seg),
               reinterpret_cast<int64_t*>(sel_pairs), reinterpret_cast<double*>(sel_coef),
               reinterpret_cast<int64_t*>(closest), reinterpret_cast<double*>(inter_vec));
  });
}

void range_loss_backward(MK_PARAMS(MK_RANGE_LOSS_BACKWARD_ARGS)) {
  constexpr const char* fn = "range_loss_backward";
  // The dtype code decides how grad_loss is read: checked first.
  const DType type = check_dtype(fn, "dtype", dtype);
  check_range_sizes(fn, B, D, k2);
  if (B == 0) return;
  check_ptrs(fn, {{"grad_loss", grad_loss}, {"emb", emb}, {"row_seg", row_seg}, {"sel_pairs", sel_pairs},
                  {"sel_coef", sel_coef}, {"closest", closest}, {"grad_emb", grad_emb}});
  if (D > 0) check_ptr(fn, "inter_vec", inter_vec);
  // The saved forward outputs are indices: each must address the buffers it is used on.
  const int64_t* rs = reinterpret_cast<const int64_t*>(row_seg);
  const int64_t* sel = reinterpret_cast<const int64_t*>(sel_pairs);
  const int64_t* cl = reinterpret_cast<const int64_t*>(closest);
  check_indices(fn, "row_seg", rs, B, 0, B);
  for (int64_t i = 0; i < B * k2; ++i) {
    const int64_t a = sel[2 * i], b = sel[2 * i + 1];
    MK_CHECK(a == -1 || (a >= 0 && a < B && b >= 0 && b < B),
             std::string(fn) + ": sel_pairs[" + str(i / k2) + ", " + str(i % k2) + "] = (" + str(a) + ", " + str(b) +
                 ") is neither a pair of rows in [0, B) = [0, " + str(B) + ") nor the pad -1");
  }
  check_indices(fn, "closest", cl, 2, -1, B);
  for (int s = 0; s < 2; ++s)
    MK_CHECK(cl[s] < 0 || cl[2 + s] >= 1, std::string(fn) + ": closest[" + std::to_string(2 + s) + "] = " +
                                              str(cl[2 + s]) + " must be >= 1 (the size of segment closest[" +
                                              std::to_string(s) + "] = " + str(cl[s]) + ")");
  // The loss (and so its gradient) is float64 for float64 embeddings, float32 otherwise.
  const double gout = type == DType::f64 ? *reinterpret_cast<const double*>(grad_loss)
                                         : (double)*reinterpret_cast<const float*>(grad_loss);
  dispatch_host_float(type, [&](auto tag) {
    using T = decltype(tag);
    backward<T>(gout, reinterpret_cast<const T*>(emb), B, D, k2, rs, sel, reinterpret_cast<const double*>(sel_coef),
                cl, reinterpret_cast<const double*>(inter_vec), reinterpret_cast<T*>(grad_emb));
  });
}

}  // namespace cpu
}  // namespace mk
