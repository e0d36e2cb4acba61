// Argument checks of the raw entry points: the C++ side checks what it is given (sizes, ranges,
// dtype codes, index values it reads) before touching memory, so a bad call raises ValueError
// (pybind11 translates std::invalid_argument) instead of corrupting memory.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <limits>
#include <string>

#include "common.h"
#include "signature.h"

namespace mk {

inline std::string str(int64_t v) { return std::to_string(v); }

// A size: 0 <= v.
inline void check_size(const char* fn, const char* name, int64_t v) {
  MK_CHECK(v >= 0, std::string(fn) + ": " + name + " = " + str(v) + " must be >= 0");
}

// a * b fits in int64 (both >= 0): element counts of (a, b) buffers.
inline void check_product(const char* fn, const char* what, int64_t a, int64_t b) {
  MK_CHECK(a == 0 || b <= std::numeric_limits<int64_t>::max() / a,
           std::string(fn) + ": " + what + " = " + str(a) + " * " + str(b) + " overflows int64");
}

// A floating dtype code (mk::DType) before it is used; returns it as DType.
inline DType check_dtype(const char* fn, const char* name, int code) {
  MK_CHECK(code >= 0 && code <= 3, std::string(fn) + ": " + name + " = " + std::to_string(code) +
                                       " is not a dtype code (allowed: 0 float32, 1 float16, 2 bfloat16, 3 float64)");
  return (DType)code;
}

// A non-null pointer for a buffer that will be read or written.
inline void check_ptr(const char* fn, const char* name, ptr_t p) {
  MK_CHECK(p != 0, std::string(fn) + ": " + name + " is a null pointer");
}

// Every named pointer is non-null.
inline void check_ptrs(const char* fn, std::initializer_list<std::pair<const char*, ptr_t>> ptrs) {
  for (const auto& np : ptrs) check_ptr(fn, np.first, np.second);
}

// Every v[i] (i < n) lies in [low, high) (an index into a buffer of that extent).
inline void check_indices(const char* fn, const char* name, const int64_t* v, int64_t n, int64_t low,
                          int64_t high) {
  for (int64_t i = 0; i < n; ++i)
    MK_CHECK(v[i] >= low && v[i] < high, std::string(fn) + ": " + name + "[" + str(i) + "] = " + str(v[i]) +
                                             " is outside [" + str(low) + ", " + str(high) + ")");
}

// Labels of a stable sort: every entry that is not ignore_index lies in [0, C).
inline void check_labels(const char* fn, const int64_t* sorted_labels, int64_t B, int64_t C,
                         int64_t ignore_index) {
  for (int64_t i = 0; i < B; ++i) {
    const int64_t y = sorted_labels[i];
    MK_CHECK(y == ignore_index || (y >= 0 && y < C),
             std::string(fn) + ": sorted_labels[" + str(i) + "] = " + str(y) + " is outside [0, C) = [0, " + str(C) +
                 ") and is not ignore_index = " + str(ignore_index));
  }
}

}  // namespace mk
