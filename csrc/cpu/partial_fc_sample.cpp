// Partial FC class sampling, CPU.
// Local classes 0..n-1 (n = stop - start). Positives: classes some label in [start, stop) hits.
// Negatives: the m non-positive classes with the smallest sample_key(seed, start + c) (see
// common.h): a uniformly random m-subset, identical on CPU and CUDA for the same seed.
// Shards are 0 <= start <= stop with fewer than 2^31 classes (flags hold int32 positions).
#include <algorithm>
#include <vector>

#include "checks.h"
#include "ops/partial_fc_sample.h"

namespace mk {
namespace cpu {

namespace {
// 0 <= start <= stop, n = stop - start < 2^31 (flags hold int32 positions), B >= 0.
void check_shard(const char* fn, int64_t start, int64_t stop, int64_t B) {
  MK_CHECK(start >= 0, std::string(fn) + ": start = " + str(start) + " must be >= 0");
  MK_CHECK(stop >= start, std::string(fn) + ": stop = " + str(stop) + " must be >= start = " + str(start));
  MK_CHECK(stop - start < (int64_t(1) << 31),
           std::string(fn) + ": stop - start = " + str(stop - start) + " must be < 2^31");
  check_size(fn, "B", B);
}
}  // namespace

int64_t partial_fc_mark(MK_PARAMS(MK_PARTIAL_FC_MARK_ARGS)) {
  constexpr const char* fn = "partial_fc_mark";
  check_shard(fn, start, stop, B);
  const int64_t n = stop - start;
  if (n > 0) check_ptr(fn, "flags", flags);
  if (B > 0) check_ptr(fn, "labels", labels);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  int32_t* flg = reinterpret_cast<int32_t*>(flags);
  std::fill(flg, flg + n, 0);
  int64_t P = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = lab[i];
    if (y >= start && y < stop && !flg[y - start]) {
      flg[y - start] = 1;
      ++P;
    }
  }
  return P;
}

void partial_fc_select(MK_PARAMS(MK_PARTIAL_FC_SELECT_ARGS)) {
  constexpr const char* fn = "partial_fc_select";
  check_shard(fn, start, stop, B);
  check_size(fn, "m", m);
  check_size(fn, "num_index", num_index);
  const int64_t n = stop - start;
  if (n > 0) check_ptr(fn, "flags", flags);
  if (B > 0) check_ptrs(fn, {{"labels", labels}, {"local_labels", local_labels}});
  if (num_index > 0) check_ptr(fn, "index", index);
  int32_t* flg = reinterpret_cast<int32_t*>(flags);
  const int64_t* lab = reinterpret_cast<const int64_t*>(labels);
  int64_t* idx = reinterpret_cast<int64_t*>(index);
  int64_t* local = reinterpret_cast<int64_t*>(local_labels);
  // index holds exactly the positives plus the m negatives: checked before anything is written.
  int64_t P = 0;
  for (int64_t c = 0; c < n; ++c) P += flg[c] != 0;
  MK_CHECK(m <= n - P, std::string(fn) + ": m = " + str(m) + " negatives asked but only n - P = " + str(n - P) +
                           " classes are unflagged");
  MK_CHECK(P + m == num_index, std::string(fn) + ": num_index = " + str(num_index) + " must be P + m = " +
                                   str(P) + " + " + str(m) + " (flagged positives plus negatives)");
  if (m > 0) {
    const uint64_t salt = seed_salt(seed);
    std::vector<uint64_t> keys;
    keys.reserve((size_t)n);
    for (int64_t c = 0; c < n; ++c)
      if (!flg[c]) keys.push_back(sample_key(salt, start + c));
    if (m < (int64_t)keys.size()) {
      std::nth_element(keys.begin(), keys.begin() + (m - 1), keys.end());
      const uint64_t thresh = keys[(size_t)(m - 1)];  // keys are distinct: exactly m are <= thresh
      for (int64_t c = 0; c < n; ++c)
        if (!flg[c] && sample_key(salt, start + c) <= thresh) flg[c] = 1;
    } else {
      for (int64_t c = 0; c < n; ++c) flg[c] = 1;
    }
  }
  // Exclusive scan: flg[c] becomes the position of class c in index (or -1).
  int64_t pos = 0;
  for (int64_t c = 0; c < n; ++c) {
    if (flg[c]) {
      idx[pos] = c;
      flg[c] = (int32_t)pos;  // n < 2^31 (check_shard)
      ++pos;
    } else {
      flg[c] = -1;
    }
  }
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = lab[i];
    local[i] = (y >= start && y < stop) ? (int64_t)flg[y - start] : -1;
  }
}

}  // namespace cpu
}  // namespace mk
