// SIMD vector types of the CPU loops (GCC/Clang vector extensions), and the run-time choice
// between the baseline build of the loops and the AVX2+FMA build.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace grad_ext {
namespace cpu {

constexpr int64_t kLanes = 8;  // channels per vector: one AVX2 register of float

#define GRAD_EXT_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define GRAD_EXT_AVX2_DISPATCH 1
#endif

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename T>
using simd_t = typename Simd<T>::type;

template <typename T>
GRAD_EXT_INLINE simd_t<T> load_lanes(const T* p) {
  simd_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
GRAD_EXT_INLINE void store_lanes(T* p, simd_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// The sum of a vector's lanes, pairwise (halves added until one lane is left): three vector
// additions instead of seven dependent scalar ones.
template <typename T>
GRAD_EXT_INLINE T sum_lanes(simd_t<T> v) {
  static_assert(kLanes == 8, "sum_lanes halves an 8-lane vector");
  typedef T half_t __attribute__((vector_size(4 * sizeof(T))));
  typedef T quarter_t __attribute__((vector_size(2 * sizeof(T))));
  const half_t h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const quarter_t q = __builtin_shufflevector(h, h, 0, 1) + __builtin_shufflevector(h, h, 2, 3);
  return q[0] + q[1];
}

// The SIMD level of the cell-major loops: the best this CPU has, unless the environment
// variable GRAD_EXT_CPU_SIMD asks for "baseline" (to compare or test the portable build).
inline bool pick_avx2() {
  const char* env = std::getenv("GRAD_EXT_CPU_SIMD");
  const std::string want = env ? env : "auto";
  TORCH_CHECK(want == "auto" || want == "baseline" || want == "avx2",
              "GRAD_EXT_CPU_SIMD must be 'auto', 'baseline' or 'avx2', got '", want, "'");
#ifdef GRAD_EXT_AVX2_DISPATCH
  const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  const bool has = false;
#endif
  TORCH_CHECK(want != "avx2" || has, "GRAD_EXT_CPU_SIMD=avx2, but this CPU or build has no AVX2+FMA");
  return has && want != "baseline";
}

inline bool cpu_has_avx2() {
  static const bool use = pick_avx2();
  return use;
}

}  // namespace cpu
}  // namespace grad_ext
