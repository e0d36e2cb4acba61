// CPU helper: walk the label segments of a stably sorted label array.
#pragma once

#include <cstdint>

namespace mk {
namespace cpu {

// Calls f(g, begin, end) for each run of equal values in sorted[0, n), g = 0, 1, ...
template <typename F>
inline int64_t for_each_segment(const int64_t* sorted, int64_t n, F&& f) {
  int64_t g = 0;
  for (int64_t p = 0; p < n;) {
    int64_t q = p + 1;
    while (q < n && sorted[q] == sorted[p]) ++q;
    f(g, p, q);
    ++g;
    p = q;
  }
  return g;
}

}  // namespace cpu
}  // namespace mk
