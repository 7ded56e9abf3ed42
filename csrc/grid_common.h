// Coordinate arithmetic of grid sampling, shared by the CPU and CUDA kernels.
//
// A table has d spatial axes (axis 0 outermost, axis d-1 the width). A grid point holds d
// normalised coordinates in grid_sample order: component k addresses axis d-1-k (x is the
// width). Everything here mirrors torch.nn.functional.grid_sample, including its handling of
// coordinates on the borders, far outside, infinite or NaN.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GE_HD __host__ __device__ __forceinline__
#else
#define GE_HD inline
#endif

namespace grad_ext {

constexpr int kMaxDim = 4;
enum Interpolation : int { kBilinear = 0, kNearest = 1 };
enum Padding : int { kZeros = 0, kBorder = 1, kReflection = 2 };

// F.grid_sample treats non-finite coordinates differently on its code paths (CPU 2-D is
// vectorised, CPU 3-D and CUDA are scalar, and CUDA clips differently in its backward pass);
// a policy reproduces each one.
enum class NanClip : int { kToZero, kToMax, kKeep };
struct NonFinitePolicy {
  NanClip nan_clip;     // border clipping of NaN: to 0, to size-1 (CPU scalar), or kept (CUDA backward)
  bool downgrade;       // non-finite or huge indices become -100, i.e. outside (scalar paths)
  bool saturate_flips;  // reflection: a flip count beyond INT_MAX is INT_MAX (odd), as CUDA's float->int
};

// CPU: the 2-D path of F.grid_sample is vectorised (NaN clips to 0, no downgrade), the 3-D
// path is scalar; 1-D and 4-D tables follow the 2-D rule. CUDA: scalar code everywhere; its
// backward pass clips with clip_coordinates_set_grad, which lets NaN through, so a NaN
// coordinate is outside there (no gradient) while the forward pass samples cell 0.
GE_HD NonFinitePolicy cpu_policy(int D) {
  return D == 3 ? NonFinitePolicy{NanClip::kToMax, true, false} : NonFinitePolicy{NanClip::kToZero, false, false};
}
GE_HD NonFinitePolicy cuda_policy() { return NonFinitePolicy{NanClip::kToZero, true, true}; }
GE_HD NonFinitePolicy cuda_backward_policy() { return NonFinitePolicy{NanClip::kKeep, true, true}; }

template <typename T>
GE_HD bool finite(T x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

template <typename T>
GE_HD T unnormalize(T coord, int64_t size, bool align_corners, T* grad) {
  if (align_corners) {
    *grad = T(size - 1) / 2;
    return (coord + 1) / 2 * T(size - 1);
  }
  *grad = T(size) / 2;
  return ((coord + 1) * T(size) - 1) / 2;
}

// Clip to [0, size-1]; the gradient is 1 strictly inside and 0 on or beyond the borders.
template <typename T>
GE_HD T clip_coordinate(T x, int64_t size, const NonFinitePolicy& policy, T* grad) {
  const T hi = T(size - 1);
  *grad = T(0);
  if (x > T(0)) {
    if (x < hi) {
      *grad = T(1);
      return x;
    }
    return hi;
  }
  if (x <= T(0)) return T(0);
  // NaN
  if (policy.nan_clip == NanClip::kKeep) {
    *grad = T(1);
    return x;
  }
  return policy.nan_clip == NanClip::kToMax ? hi : T(0);
}

// Reflect x about the borders twice_low/2 and twice_high/2 until it falls inside.
template <typename T>
GE_HD T reflect_coordinate(T x, int64_t twice_low, int64_t twice_high, const NonFinitePolicy& policy, T* grad) {
  if (twice_low == twice_high) {
    *grad = T(0);
    return T(0);
  }
  const T low = T(twice_low) / 2, span = T(twice_high - twice_low) / 2;
  x = x - low;
  T sign = T(1);
  if (x < T(0)) {
    sign = T(-1);
    x = -x;
  }
  const T extra = fmod(x, span);
  // Parity of the number of flips without an integer cast that could overflow; where
  // F.grid_sample's cast saturates (CUDA), a count of 2^31 or more is INT_MAX, odd.
  const T flips = floor(x / span);
  const bool odd = (policy.saturate_flips && flips >= T(2147483648.0)) || fmod(flips, T(2)) == T(1);
  if (!odd) {
    *grad = sign;
    return extra + low;
  }
  *grad = -sign;
  return span - extra + low;
}

// Index into an axis of `size` cells for a normalised coordinate; *grad = d index / d coord.
template <typename T>
GE_HD T source_index(T coord, int64_t size, int padding, bool align_corners,
                     const NonFinitePolicy& policy, T* grad) {
  T g_unnorm;
  T x = unnormalize(coord, size, align_corners, &g_unnorm);
  T g = g_unnorm;
  if (padding == kBorder) {
    T g_clip;
    x = clip_coordinate(x, size, policy, &g_clip);
    g *= g_clip;
  } else if (padding == kReflection) {
    T g_refl, g_clip;
    x = align_corners ? reflect_coordinate(x, 0, 2 * (size - 1), policy, &g_refl)
                      : reflect_coordinate(x, -1, 2 * size - 1, policy, &g_refl);
    x = clip_coordinate(x, size, policy, &g_clip);
    g *= g_refl * g_clip;
  }
  if (policy.downgrade && (x > T(INT_MAX - 1) || x < T(INT_MIN) || !finite(x))) x = T(-100);
  *grad = g;
  return x;
}

// The corners of one sampling point: K = 2^D for bilinear, 1 for nearest. Corners outside
// the table have their bit cleared in `valid`; what F.grid_sample would add for them
// (weight * 0, i.e. 0 or NaN) is kept in `bias` (and `grad_bias` per axis).
template <typename T, int D>
struct PointCorners {
  static constexpr int K = 1 << D;
  int64_t offset[K];
  T weight[K];
  T t[D];         // fractional position per axis (bilinear)
  T mult[D];      // d index / d coordinate per axis
  unsigned valid;
  T bias;
  T grad_bias[D];
};

// Derivative of corner k's weight along axis a (bilinear): the product of the other axes'
// weights, signed by the side of the corner.
template <typename T, int D>
GE_HD T corner_weight_grad(const PointCorners<T, D>& pc, int k, int a) {
  T g = ((k >> (D - 1 - a)) & 1) ? T(1) : T(-1);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int b = 0; b < D; ++b) {
    if (b == a) continue;
    g *= ((k >> (D - 1 - b)) & 1) ? pc.t[b] : T(1) - pc.t[b];
  }
  return g;
}

// coords: the D grid components in grid_sample order; sizes/strides: per table axis.
template <typename T, int D>
GE_HD void setup_corners(const T* coords, const int64_t* sizes, const int64_t* strides,
                         int interpolation, int padding, bool align_corners,
                         const NonFinitePolicy& policy, bool with_grad, PointCorners<T, D>& pc) {
  T x[D];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int a = 0; a < D; ++a) {
    x[a] = source_index(coords[D - 1 - a], sizes[a], padding, align_corners, policy, &pc.mult[a]);
  }
  pc.bias = T(0);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int a = 0; a < D; ++a) pc.grad_bias[a] = T(0);

  if (interpolation == kNearest) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int a = 0; a < D; ++a) pc.t[a] = T(0);  // unused: a piecewise constant has no weight gradient
    int64_t off = 0;
    bool inside = true;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int a = 0; a < D; ++a) {
      const T r = nearbyint(x[a]);  // round half to even, as F.grid_sample
      inside = inside && r >= T(0) && r < T(sizes[a]);
      if (inside) off += static_cast<int64_t>(r) * strides[a];
    }
    pc.valid = inside ? 1u : 0u;
    pc.offset[0] = inside ? off : 0;
    pc.weight[0] = T(1);
    return;
  }

  int64_t base[D];
  bool in_lo[D], in_hi[D];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int a = 0; a < D; ++a) {
    const T f = floor(x[a]);
    pc.t[a] = x[a] - f;
    in_lo[a] = f >= T(0) && f < T(sizes[a]);
    in_hi[a] = f + T(1) >= T(0) && f + T(1) < T(sizes[a]);
    // Only cast when the index is small enough to be meaningful.
    base[a] = (f >= T(-1) && f < T(sizes[a])) ? static_cast<int64_t>(f) : 0;
  }
  pc.valid = 0u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < PointCorners<T, D>::K; ++k) {
    T w = T(1);
    int64_t off = 0;
    bool inside = true;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int a = 0; a < D; ++a) {
      const bool hi = (k >> (D - 1 - a)) & 1;
      w *= hi ? pc.t[a] : T(1) - pc.t[a];
      inside = inside && (hi ? in_hi[a] : in_lo[a]);
      off += (base[a] + (hi ? 1 : 0)) * strides[a];
    }
    pc.weight[k] = w;
    if (inside) {
      pc.valid |= 1u << k;
      pc.offset[k] = off;
    } else {
      pc.offset[k] = 0;
      pc.bias += w * T(0);
      if (with_grad) {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int a = 0; a < D; ++a) pc.grad_bias[a] += corner_weight_grad(pc, k, a) * T(0);
      }
    }
  }
}

}  // namespace grad_ext
