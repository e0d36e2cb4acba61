// marginkit csrc: shared definitions for the CPU and CUDA kernels.
// Plain C++17: no torch headers. Tensors arrive as raw pointers + sizes.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace mk {

// Element types of floating tensors, as the Python wrapper encodes them.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
  }
  return "?";
}

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument("marginkit._C: " + msg); }

#define MK_CHECK(cond, msg)                 \
  do {                                      \
    if (!(cond)) ::mk::fail(std::string(msg)); \
  } while (0)

// 16-bit storage types for the CPU kernels (bit patterns of IEEE half and bfloat16).
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t f;
  if (exp == 0) {
    if (man == 0) {
      f = sign;
    } else {  // subnormal half -> normal float
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      man &= 0x3FFu;
      f = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1F) {
    f = sign | 0x7F800000u | (man << 13);
  } else {
    f = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

inline uint16_t float_to_half(float v) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &v, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u));
  if (absx >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to inf
  if (absx < 0x38800000u) {                                      // subnormal or zero half
    if (absx < 0x33000000u) return (uint16_t)sign;               // < half of smallest subnormal
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - (int)e;  // 14 + (113 - e)
    const uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t r = q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u);
    return (uint16_t)(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t lsb = (r >> 13) & 1u;
  r += 0xFFFu + lsb;
  return (uint16_t)(sign | (r >> 13));
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t f = (uint32_t)h << 16;
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even, NaN stays NaN
  uint32_t x;
  std::memcpy(&x, &v, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);
  const uint32_t lsb = (x >> 16) & 1u;
  x += 0x7FFFu + lsb;
  return (uint16_t)(x >> 16);
}

// The type the optimizer steps do a T element's arithmetic in, as torch.optim does: double for
// double, float for float and the 16-bit types (the CPU and CUDA sparse steps share it).
template <typename T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

// Host-side load/store of one element as float/double.
template <typename T> struct HostIO;
template <> struct HostIO<float> {
  static double load(const float* p, int64_t i) { return (double)p[i]; }
  static void store(float* p, int64_t i, double v) { p[i] = (float)v; }
};
template <> struct HostIO<double> {
  static double load(const double* p, int64_t i) { return p[i]; }
  static void store(double* p, int64_t i, double v) { p[i] = v; }
};
template <> struct HostIO<half_t> {
  static double load(const half_t* p, int64_t i) { return (double)half_to_float(p[i].bits); }
  static void store(half_t* p, int64_t i, double v) { p[i].bits = float_to_half((float)v); }
};
template <> struct HostIO<bf16_t> {
  static double load(const bf16_t* p, int64_t i) { return (double)bf16_to_float(p[i].bits); }
  static void store(bf16_t* p, int64_t i, double v) { p[i].bits = float_to_bf16((float)v); }
};

// Calls f(T{}) with T the host storage type of `t` (float, half_t, bf16_t, double).
template <typename F>
inline void dispatch_host_float(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(half_t{}); return;
    case DType::bf16: f(bf16_t{}); return;
    case DType::f64: f(double{}); return;
  }
  fail("unsupported dtype code " + std::to_string((int)t) +
       " (allowed: 0 float32, 1 float16, 2 bfloat16, 3 float64)");
}

// Row normalisation follows torch.nn.functional.normalize: x / max(||x||, 1e-12).
constexpr double kNormEps = 1e-12;

// Partial FC sampling keys: a bijection of the global class id for a given seed
// (splitmix64's finaliser is invertible), so all keys differ and "the m smallest
// keys" is a well defined, uniformly random m-subset. Same on CPU and CUDA.
#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif
MK_HD uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ULL;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return z;
}
MK_HD uint64_t seed_salt(uint64_t seed) { return mix64(seed + 0x9E3779B97F4A7C15ULL); }
MK_HD uint64_t sample_key(uint64_t salt, int64_t global_class) { return mix64((uint64_t)global_class ^ salt); }

}  // namespace mk
