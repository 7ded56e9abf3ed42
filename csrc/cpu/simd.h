// SIMD vector types of the CPU loops (GCC/Clang vector extensions), and the run-time choice
// between the baseline build of the loops and the AVX2+FMA build.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

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

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define GRAD_EXT_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
// older GCC: __builtin_shuffle, whose index vector has integers as wide as the elements
template <typename T>
struct ShuffleIndex {
  typedef typename std::conditional<sizeof(T) == 8, int64_t, int32_t>::type type;
  typedef type vector __attribute__((vector_size(kLanes * sizeof(type))));
};
#define GRAD_EXT_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, typename ShuffleIndex<T>::vector{__VA_ARGS__})
#endif

// The sum of a vector's lanes, pairwise (the upper half added to the lower until one lane is
// left): three vector additions instead of seven dependent scalar ones.
template <typename T>
GRAD_EXT_INLINE T sum_lanes(simd_t<T> v) {
  static_assert(kLanes == 8, "sum_lanes halves an 8-lane vector");
  v += GRAD_EXT_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += GRAD_EXT_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += GRAD_EXT_SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
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
