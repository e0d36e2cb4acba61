// Partial FC class sampling, CPU.
// Local classes 0..n-1 (n = stop - start). Positives: classes some label in [start, stop) hits.
// Negatives: the m non-positive classes with the smallest sample_key(seed, start + c) (see
// common.h): a uniformly random m-subset, identical on CPU and CUDA for the same seed.
#include <algorithm>
#include <vector>

#include "ops.h"

namespace mk {
namespace cpu {

int64_t partial_fc_mark(ptr_t labels_p, int64_t B, int64_t start, int64_t stop, ptr_t flags_p) {
  const int64_t* labels = reinterpret_cast<const int64_t*>(labels_p);
  int32_t* flags = reinterpret_cast<int32_t*>(flags_p);
  const int64_t n = stop - start;
  std::fill(flags, flags + n, 0);
  int64_t P = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = labels[i];
    if (y >= start && y < stop && !flags[y - start]) {
      flags[y - start] = 1;
      ++P;
    }
  }
  return P;
}

void partial_fc_select(ptr_t flags_p, int64_t start, int64_t stop, uint64_t seed, int64_t m,
                       ptr_t labels_p, int64_t B, ptr_t index_p, ptr_t local_labels_p) {
  int32_t* flags = reinterpret_cast<int32_t*>(flags_p);
  const int64_t* labels = reinterpret_cast<const int64_t*>(labels_p);
  int64_t* index = reinterpret_cast<int64_t*>(index_p);
  int64_t* local = reinterpret_cast<int64_t*>(local_labels_p);
  const int64_t n = stop - start;
  if (m > 0) {
    const uint64_t salt = seed_salt(seed);
    std::vector<uint64_t> keys;
    keys.reserve((size_t)n);
    for (int64_t c = 0; c < n; ++c)
      if (!flags[c]) keys.push_back(sample_key(salt, start + c));
    MK_CHECK(m <= (int64_t)keys.size(), "partial_fc_select: more negatives asked than exist");
    if (m < (int64_t)keys.size()) {
      std::nth_element(keys.begin(), keys.begin() + (m - 1), keys.end());
      const uint64_t thresh = keys[(size_t)(m - 1)];  // keys are distinct: exactly m are <= thresh
      for (int64_t c = 0; c < n; ++c)
        if (!flags[c] && sample_key(salt, start + c) <= thresh) flags[c] = 1;
    } else {
      for (int64_t c = 0; c < n; ++c) flags[c] = 1;
    }
  }
  // Exclusive scan: flags[c] becomes the position of class c in index (or -1).
  int64_t pos = 0;
  for (int64_t c = 0; c < n; ++c) {
    if (flags[c]) {
      index[pos] = c;
      flags[c] = (int32_t)pos;  // n < 2^31 is checked by the wrapper
      ++pos;
    } else {
      flags[c] = -1;
    }
  }
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = labels[i];
    local[i] = (y >= start && y < stop) ? (int64_t)flags[y - start] : -1;
  }
}

}  // namespace cpu
}  // namespace mk
