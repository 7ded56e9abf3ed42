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
#include <type_traits>

#if defined(__CUDACC__)
#define GE_HD __host__ __device__ __forceinline__
#else
#define GE_HD inline
#endif

namespace grad_ext {

constexpr int kMaxDim = 4;
constexpr int kMaxCubicDim = 3;  // bicubic's 4^d taps: 64 for d = 3; 4-D (256 taps) is not offered
enum Interpolation : int { kBilinear = 0, kNearest = 1, kBicubic = 2 };
enum Padding : int { kZeros = 0, kBorder = 1, kReflection = 2 };

// F.grid_sample treats non-finite coordinates differently on its code paths (CPU 2-D is
// vectorised, CPU 3-D and CUDA are scalar, and CUDA clips differently in its backward pass);
// a policy reproduces each one.
enum class NanClip : int { kToZero, kToMax, kKeep };
struct NonFinitePolicy {
  NanClip nan_clip;       // border clipping of NaN: to 0, to size-1 (CPU scalar), or kept (CUDA backward)
  bool downgrade;         // non-finite or huge indices become -100, i.e. outside (scalar paths)
  bool saturate_flips;    // reflection: a flip count beyond INT_MAX is INT_MAX (odd), as CUDA's float->int
  bool nan_tap_is_cell0;  // bicubic, zeros padding: a NaN tap index is cell 0, as CUDA's float->int cast makes it
};

// CPU: the 2-D path of F.grid_sample is vectorised (NaN clips to 0, no downgrade), the 3-D
// path is scalar; 1-D and 4-D tables follow the 2-D rule. CUDA: scalar code everywhere; its
// backward pass clips with clip_coordinates_set_grad, which lets NaN through, so a NaN
// coordinate is outside there (no gradient) while the forward pass samples cell 0.
GE_HD NonFinitePolicy cpu_policy(int D) {
  return D == 3 ? NonFinitePolicy{NanClip::kToMax, true, false, false}
                : NonFinitePolicy{NanClip::kToZero, false, false, false};
}
GE_HD NonFinitePolicy cuda_policy() { return NonFinitePolicy{NanClip::kToZero, true, true, true}; }
GE_HD NonFinitePolicy cuda_backward_policy() { return NonFinitePolicy{NanClip::kKeep, true, true, true}; }

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
GE_HD T source_index(T coord, int64_t size, int padding, bool align_corners, const NonFinitePolicy& policy, T* grad) {
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

// Cubic convolution (Keys 1981) with A = -0.75, the kernel of F.grid_sample's bicubic mode and
// ONNX's cubic: for a distance s to a tap, (A+2)|s|^3 - (A+3)|s|^2 + 1 where |s| <= 1 and
// A|s|^3 - 5A|s|^2 + 8A|s| - 4A where 1 < |s| < 2. w[i] is the weight of tap floor(x) - 1 + i
// at fraction t = x - floor(x), dw[i] its derivative with respect to x.
template <typename T>
GE_HD void cubic_weights(T t, T w[4], T dw[4]) {
  const T A = T(-0.75);
  const T s0 = t + T(1), s1 = t, s2 = T(1) - t, s3 = T(2) - t;  // distances to the 4 taps
  w[0] = ((A * s0 - T(5) * A) * s0 + T(8) * A) * s0 - T(4) * A;
  w[1] = ((A + T(2)) * s1 - (A + T(3))) * s1 * s1 + T(1);
  w[2] = ((A + T(2)) * s2 - (A + T(3))) * s2 * s2 + T(1);
  w[3] = ((A * s3 - T(5) * A) * s3 + T(8) * A) * s3 - T(4) * A;
  // d/dt of the pieces; taps 2 and 3 lie on the other side, so ds/dt = -1 there
  dw[0] = (T(3) * A * s0 - T(10) * A) * s0 + T(8) * A;
  dw[1] = (T(3) * (A + T(2)) * s1 - T(2) * (A + T(3))) * s1;
  dw[2] = -((T(3) * (A + T(2)) * s2 - T(2) * (A + T(3))) * s2);
  dw[3] = -((T(3) * A * s3 - T(10) * A) * s3 + T(8) * A);
}

// Integer powers for tap counts: Pow<4, 3>::value == 64.
template <int B, int E>
struct Pow {
  static constexpr int value = B * Pow<B, E - 1>::value;
};
template <int B>
struct Pow<B, 0> {
  static constexpr int value = 1;
};

// Taps per axis of each interpolation: nearest 1, bilinear 2, bicubic 4.
template <int TAPS>
struct TapBits;
template <>
struct TapBits<1> {
  static constexpr int value = 0;
};
template <>
struct TapBits<2> {
  static constexpr int value = 1;
};
template <>
struct TapBits<4> {
  static constexpr int value = 2;
};

// Bit set of a point's taps inside the table; 64 bits for 3-D bicubic's 4^3 taps.
template <int K>
struct TapMask {
  typedef typename std::conditional<(K > 32), uint64_t, uint32_t>::type type;
};
template <int K>
GE_HD typename TapMask<K>::type all_taps() {
  typedef typename TapMask<K>::type M;
  return K >= 64 ? ~M(0) : static_cast<M>((uint64_t(1) << K) - 1u);
}

// The taps of one sampling point: TAPS per axis (1 nearest, 2 bilinear, 4 bicubic), K = TAPS^D
// in all; tap k takes, along axis a, tap number digit(k, a) of that axis (axis 0 in the highest
// digit). Taps outside the table have their bit cleared in `valid`; what F.grid_sample would add
// for them (weight * 0, i.e. 0 or NaN) is kept in `bias` (and `grad_bias` per axis).
template <typename T, int D, int TAPS = 2>
struct PointCorners {
  static constexpr int K = Pow<TAPS, D>::value;
  typedef typename TapMask<K>::type Mask;
  int64_t offset[K];
  T weight[K];
  T w[D][TAPS];   // per axis, the weight of each tap (bilinear: 1 - t, t)
  T dw[D][TAPS];  // ... and its derivative with respect to the source index (bilinear: -1, 1)
  T mult[D];      // d index / d coordinate per axis
  Mask valid;
  T bias;
  T grad_bias[D];

  static GE_HD int digit(int k, int a) { return (k >> (TapBits<TAPS>::value * (D - 1 - a))) & (TAPS - 1); }
};

// Derivative of tap k's weight along axis a: that axis's weight derivative times the other
// axes' weights.
template <typename T, int D, int TAPS>
GE_HD T corner_weight_grad(const PointCorners<T, D, TAPS>& pc, int k, int a) {
  T g = pc.dw[a][PointCorners<T, D, TAPS>::digit(k, a)];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int b = 0; b < D; ++b) {
    if (b == a) continue;
    g *= pc.w[b][PointCorners<T, D, TAPS>::digit(k, b)];
  }
  return g;
}

// A bicubic tap index (an integer value) padded as F.grid_sample pads it: unchanged for zeros,
// clipped for border, reflected and clipped for reflection. No gradient flows through it.
template <typename T>
GE_HD T pad_tap(T x, int64_t size, int padding, bool align_corners, const NonFinitePolicy& policy) {
  T unused;
  if (padding == kBorder) return clip_coordinate(x, size, policy, &unused);
  if (padding == kReflection) {
    x = align_corners ? reflect_coordinate(x, 0, 2 * (size - 1), policy, &unused)
                      : reflect_coordinate(x, -1, 2 * size - 1, policy, &unused);
    return clip_coordinate(x, size, policy, &unused);
  }
  return x;
}

// coords: the D grid components in grid_sample order; sizes/strides: per table axis. TAPS must
// fit the interpolation: 4 for bicubic, 2 for bilinear, any for nearest.
template <typename T, int D, int TAPS>
GE_HD void setup_corners(const T* coords, const int64_t* sizes, const int64_t* strides, int interpolation, int padding,
                         bool align_corners, const NonFinitePolicy& policy, bool with_grad,
                         PointCorners<T, D, TAPS>& pc) {
  typedef PointCorners<T, D, TAPS> PC;
  pc.bias = T(0);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int a = 0; a < D; ++a) pc.grad_bias[a] = T(0);

  if (interpolation == kNearest) {
    int64_t off = 0;
    bool inside = true;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int a = 0; a < D; ++a) {
      const T x = source_index(coords[D - 1 - a], sizes[a], padding, align_corners, policy, &pc.mult[a]);
      const T r = nearbyint(x);  // round half to even, as F.grid_sample
      inside = inside && r >= T(0) && r < T(sizes[a]);
      if (inside) off += static_cast<int64_t>(r) * strides[a];
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int i = 0; i < TAPS; ++i) pc.w[a][i] = pc.dw[a][i] = T(0);  // piecewise constant: no weight gradient
    }
    pc.valid = inside ? typename PC::Mask(1) : typename PC::Mask(0);
    pc.offset[0] = inside ? off : 0;
    pc.weight[0] = T(1);
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 1; k < PC::K; ++k) {  // unused (valid has bit 0 only); defined all the same
      pc.offset[k] = 0;
      pc.weight[k] = T(0);
    }
    return;
  }

  // Per axis: each tap's weight, whether it is inside, and its offset along the axis.
  bool in[D][TAPS];
  int64_t cell[D][TAPS];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int a = 0; a < D; ++a) {
    if constexpr (TAPS == 4) {
      // Bicubic: the source index is not padded (only the taps are), so its derivative is
      // the unnormalisation's alone.
      const T x = unnormalize(coords[D - 1 - a], sizes[a], align_corners, &pc.mult[a]);
      const T f = floor(x);
      cubic_weights(x - f, pc.w[a], pc.dw[a]);
      // F.grid_sample pads the taps as its forward pass pads coordinates in both passes:
      // a NaN clips like the forward pass's.
      NonFinitePolicy tap_policy = policy;
      if (tap_policy.nan_clip == NanClip::kKeep) tap_policy.nan_clip = NanClip::kToZero;
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int i = 0; i < TAPS; ++i) {
        T p = pad_tap(f + T(i - 1), sizes[a], padding, align_corners, tap_policy);
        if (policy.nan_tap_is_cell0 && p != p) p = T(0);  // its weight is NaN as well
        in[a][i] = p >= T(0) && p < T(sizes[a]);
        cell[a][i] = in[a][i] ? static_cast<int64_t>(p) * strides[a] : 0;
      }
    } else {
      const T x = source_index(coords[D - 1 - a], sizes[a], padding, align_corners, policy, &pc.mult[a]);
      const T f = floor(x);
      const T t = x - f;
      pc.w[a][0] = T(1) - t;
      pc.w[a][TAPS - 1] = t;
      pc.dw[a][0] = T(-1);
      pc.dw[a][TAPS - 1] = T(1);
      in[a][0] = f >= T(0) && f < T(sizes[a]);
      in[a][TAPS - 1] = f + T(1) >= T(0) && f + T(1) < T(sizes[a]);
      // Only cast when the index is small enough to be meaningful.
      const int64_t base = (f >= T(-1) && f < T(sizes[a])) ? static_cast<int64_t>(f) : 0;
      cell[a][0] = base * strides[a];
      cell[a][TAPS - 1] = (base + 1) * strides[a];
    }
  }
  pc.valid = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < PC::K; ++k) {
    T w = T(1);
    int64_t off = 0;
    bool inside = true;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int a = 0; a < D; ++a) {
      const int i = PC::digit(k, a);
      w *= pc.w[a][i];
      inside = inside && in[a][i];
      off += cell[a][i];
    }
    pc.weight[k] = w;
    if (inside) {
      pc.valid |= typename PC::Mask(1) << k;
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
