// Row loops of the CPU sample_grid: for each channel row of the table, the tile's points in
// turn (tables too large for cache, read by few corners per cell).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>

#include "cpu/simd.h"
#include "grid_common.h"
#include "philox.h"
#include "sample_grid.h"

#ifdef GRAD_EXT_AVX2_DISPATCH
#include <immintrin.h>
#endif

namespace grad_ext {
namespace cpu {

// Points per tile: their corners are set up once for all channels of a task.
constexpr int64_t kPointTile = 128;

// Corner setup of one point, with the jitter added to its coordinates.
template <typename scalar_t, int D, int TAPS>
void point_corners(const scalar_t* grid, int64_t point, const GridGeometry& g, int interpolation, int padding,
                   bool align_corners, const NonFinitePolicy& policy, const JitterParams& jitter, bool with_grad,
                   PointCorners<at::opmath_type<scalar_t>, D, TAPS>& pc) {
  using acc_t = at::opmath_type<scalar_t>;
  float noise[4];
  jitter_point(jitter, point, noise);
  acc_t coords[D];
  for (int k = 0; k < D; ++k) coords[k] = static_cast<acc_t>(grid[point * D + k]) + static_cast<acc_t>(noise[k]);
  setup_corners<acc_t, D, TAPS>(coords, g.sizes, g.strides, interpolation, padding, align_corners, policy, with_grad,
                                pc);
}

// Corners (taps) of a tile of points in structure-of-arrays form, so the per-channel loops
// below run over points with compile-time corner counts: K = TAPS^D (TAPS = 1 nearest, 2
// bilinear, 4 bicubic). Invalid corners get weight 0 and offset 0; a tile where any point has
// an invalid corner (or a non-finite bias) takes the checked path. Offsets are 32-bit (the
// launcher checks that a channel's cells fit), so that 8 of them make one vector gather.
template <typename acc_t, int TAPS, int D>
struct CornerTile {
  static constexpr int K = Pow<TAPS, D>::value;
  typedef typename TapMask<K>::type Mask;
  int32_t off[K][kPointTile];
  acc_t w[K][kPointTile];
  acc_t dw[K][D][kPointTile];
  Mask valid[kPointTile];
  acc_t bias[kPointTile];
  int64_t count = 0;
  bool checked = false;  // some point has an invalid corner or a non-zero bias
  bool biased = false;   // some point has a non-zero (non-finite) bias

  template <typename scalar_t>
  void fill(const scalar_t* grid, int64_t first_point, int64_t count_, const GridGeometry& g, int interpolation,
            int padding, bool align_corners, const JitterParams& jitter, bool with_grad) {
    count = count_;
    checked = false;
    biased = false;
    const NonFinitePolicy policy = cpu_policy(D);
    PointCorners<acc_t, D, TAPS> pc;
    for (int64_t i = 0; i < count; ++i) {
      point_corners<scalar_t, D, TAPS>(grid, first_point + i, g, interpolation, padding, align_corners, policy, jitter,
                                       with_grad, pc);
      valid[i] = pc.valid;
      bias[i] = pc.bias;
      if (pc.valid != all_taps<K>() || pc.bias != acc_t(0)) checked = true;
      if (pc.bias != acc_t(0)) biased = true;
      for (int k = 0; k < K; ++k) {
        const bool ok = pc.valid >> k & 1u;
        off[k][i] = ok ? static_cast<int32_t>(pc.offset[k]) : 0;
        w[k][i] = ok ? pc.weight[k] : acc_t(0);
        if (with_grad)
          for (int a = 0; a < D; ++a) dw[k][a][i] = ok ? corner_weight_grad(pc, k, a) : acc_t(0);
      }
    }
  }
};

// Tiles per task of the row loops, which run a block of tiles channel by channel: as many as
// keep the block's corners within kRowsBlockBytes (in L2 next to the table rows), at most
// kRowsBlockMaxTiles, and no more than a batch has.
constexpr int64_t kRowsBlockBytes = 256 * 1024;
constexpr int64_t kRowsBlockMaxTiles = 16;

template <typename acc_t, int K>
int64_t rows_block_tiles(int64_t tiles_per_batch) {
  const int64_t per_tile = K * kPointTile * static_cast<int64_t>(sizeof(int32_t) + sizeof(acc_t));
  const int64_t fit = std::max<int64_t>(1, kRowsBlockBytes / per_tile);
  return std::max<int64_t>(1, std::min({fit, kRowsBlockMaxTiles, tiles_per_batch}));
}

template <typename scalar_t, typename acc_t, int TAPS, int D, bool CHECKED>
GRAD_EXT_INLINE void forward_rows_scalar(const CornerTile<acc_t, TAPS, D>& t, const scalar_t* __restrict__ row,
                                         scalar_t* __restrict__ orow, int64_t i) {
  for (; i < t.count; ++i) {
    acc_t acc = CHECKED ? t.bias[i] : acc_t(0);
    for (int k = 0; k < CornerTile<acc_t, TAPS, D>::K; ++k) {
      if (CHECKED && !(t.valid[i] >> k & 1u)) continue;
      acc += t.w[k][i] * static_cast<acc_t>(row[t.off[k][i]]);
    }
    orow[i] = static_cast<scalar_t>(acc);
  }
}

// Accumulates one tile of points, from point i on, over one channel: the input gradient into
// its row (owned by the calling task) and the grid gradient per point into gacc[a][i].
template <typename scalar_t, typename acc_t, int TAPS, int D, bool NEED_INPUT, bool NEED_GRID, bool CHECKED>
GRAD_EXT_INLINE void backward_rows_scalar(const CornerTile<acc_t, TAPS, D>& t, const scalar_t* __restrict__ row,
                                          scalar_t* __restrict__ grow, const scalar_t* __restrict__ gorow,
                                          acc_t* __restrict__ gacc, int64_t i) {
  for (; i < t.count; ++i) {
    const acc_t gv = static_cast<acc_t>(gorow[i]);
    for (int k = 0; k < CornerTile<acc_t, TAPS, D>::K; ++k) {
      if (CHECKED && !(t.valid[i] >> k & 1u)) continue;
      const int64_t off = t.off[k][i];
      if (NEED_INPUT) grow[off] += static_cast<scalar_t>(t.w[k][i] * gv);
      if (NEED_GRID) {
        const acc_t v = gv * static_cast<acc_t>(row[off]);
        for (int a = 0; a < D; ++a) gacc[a * kPointTile + i] += t.dw[k][a][i] * v;
      }
    }
  }
}

#ifdef GRAD_EXT_AVX2_DISPATCH
// float32 rows with AVX2: 8 points at a time, their corners read by one gather each (masked
// where corners are outside, so that those read nothing, as the scalar loop skips them).
// The input gradient is scattered lane by lane: points of a vector can share cells.
template <int TAPS, int D>
struct RowsAvx2 {
  using Tile = CornerTile<float, TAPS, D>;
  static constexpr int K = Tile::K;
  static_assert(K <= 32, "32-bit corner masks");

  __attribute__((target("avx2,fma"))) static inline __m256i corner_mask(__m256i valid, int k) {
    const __m256i bit = _mm256_set1_epi32(static_cast<int>(1u << k));
    return _mm256_cmpeq_epi32(_mm256_and_si256(valid, bit), bit);
  }

  // 2-D bilinear: corners 0 and 1 (and 2 and 3) are neighbours along the row, so one 64-bit
  // gather element reads both: 4 gathers of 4 elements for 8 points instead of 4 of 8. The
  // pairs come back interleaved (a0 b0 a1 b1 ...) and are split into the two corners' vectors.
  __attribute__((target("avx2,fma"))) static inline void gather_pairs(const float* row, __m256i idx, __m256* a,
                                                                      __m256* b) {
    const double* base = reinterpret_cast<const double*>(row);
    const __m256 lo = _mm256_castpd_ps(_mm256_i32gather_pd(base, _mm256_castsi256_si128(idx), 4));
    const __m256 hi = _mm256_castpd_ps(_mm256_i32gather_pd(base, _mm256_extracti128_si256(idx, 1), 4));
    // shuffles give (x0 x1 x4 x5 | x2 x3 x6 x7); the 64-bit permute puts them in order
    *a = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
    *b = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
  }

  template <bool CHECKED>
  __attribute__((target("avx2,fma"))) static void forward(const Tile& t, const float* __restrict__ row,
                                                          float* __restrict__ orow) {
    int64_t i = 0;
    for (; i + 8 <= t.count; i += 8) {
      __m256 acc = CHECKED ? _mm256_loadu_ps(t.bias + i) : _mm256_setzero_ps();
      const __m256i valid =
          CHECKED ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.valid + i)) : _mm256_setzero_si256();
      if constexpr (TAPS == 2 && D == 2) {
        const bool all_inside =
            !CHECKED ||
            _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(valid, _mm256_set1_epi32(15)))) == 0xFF;
        if (all_inside) {
          __m256 c[4];
          gather_pairs(row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.off[0] + i)), &c[0], &c[1]);
          gather_pairs(row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.off[2] + i)), &c[2], &c[3]);
          for (int k = 0; k < 4; ++k) acc = _mm256_fmadd_ps(_mm256_loadu_ps(t.w[k] + i), c[k], acc);
          _mm256_storeu_ps(orow + i, acc);
          continue;
        }
      }
      for (int k = 0; k < K; ++k) {
        const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.off[k] + i));
        const __m256 v = CHECKED ? _mm256_mask_i32gather_ps(_mm256_setzero_ps(), row, idx,
                                                            _mm256_castsi256_ps(corner_mask(valid, k)), 4)
                                 : _mm256_i32gather_ps(row, idx, 4);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(t.w[k] + i), v, acc);
      }
      _mm256_storeu_ps(orow + i, acc);
    }
    forward_rows_scalar<float, float, TAPS, D, CHECKED>(t, row, orow, i);
  }

  template <bool NEED_INPUT, bool NEED_GRID, bool CHECKED>
  __attribute__((target("avx2,fma"))) static void backward(const Tile& t, const float* __restrict__ row,
                                                           float* __restrict__ grow, const float* __restrict__ gorow,
                                                           float* __restrict__ gacc) {
    int64_t i = 0;
    alignas(32) float contrib[8];
    for (; i + 8 <= t.count; i += 8) {
      const __m256 gv = _mm256_loadu_ps(gorow + i);
      const __m256i valid =
          CHECKED ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.valid + i)) : _mm256_setzero_si256();
      __m256 ga[D];
      for (int a = 0; a < D; ++a) ga[a] = _mm256_setzero_ps();
      for (int k = 0; k < K; ++k) {
        const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.off[k] + i));
        if (NEED_GRID) {
          __m256 vg;
          if (CHECKED) {
            const __m256 m = _mm256_castsi256_ps(corner_mask(valid, k));
            // and-ed, not multiplied: a corner outside adds nothing even for a non-finite gradient
            vg = _mm256_and_ps(m, _mm256_mul_ps(gv, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), row, idx, m, 4)));
          } else {
            vg = _mm256_mul_ps(gv, _mm256_i32gather_ps(row, idx, 4));
          }
          for (int a = 0; a < D; ++a) ga[a] = _mm256_fmadd_ps(_mm256_loadu_ps(t.dw[k][a] + i), vg, ga[a]);
        }
        if (NEED_INPUT) {
          _mm256_store_ps(contrib, _mm256_mul_ps(_mm256_loadu_ps(t.w[k] + i), gv));
          for (int l = 0; l < 8; ++l) {
            if (CHECKED && !(t.valid[i + l] >> k & 1u)) continue;
            grow[t.off[k][i + l]] += contrib[l];
          }
        }
      }
      if (NEED_GRID) {
        for (int a = 0; a < D; ++a) {
          float* dst = gacc + a * kPointTile + i;
          _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), ga[a]));
        }
      }
    }
    backward_rows_scalar<float, float, TAPS, D, NEED_INPUT, NEED_GRID, CHECKED>(t, row, grow, gorow, gacc, i);
  }
};
#endif

// The tile's points over one channel c: out row c, table row c.
template <typename scalar_t, typename acc_t, int TAPS, int D, bool CHECKED>
void forward_rows(const CornerTile<acc_t, TAPS, D>& t, const scalar_t* __restrict__ table, scalar_t* __restrict__ out,
                  int64_t c, int64_t S, int64_t P) {
  const scalar_t* row = table + c * S;
  scalar_t* orow = out + c * P;
#ifdef GRAD_EXT_AVX2_DISPATCH
  if constexpr (std::is_same<scalar_t, float>::value && CornerTile<acc_t, TAPS, D>::K <= 32) {
    if (cpu_has_avx2()) return RowsAvx2<TAPS, D>::template forward<CHECKED>(t, row, orow);
  }
#endif
  forward_rows_scalar<scalar_t, acc_t, TAPS, D, CHECKED>(t, row, orow, 0);
}

// The tile's points over one channel c (see backward_rows_scalar).
template <typename scalar_t, typename acc_t, int TAPS, int D, bool NEED_INPUT, bool NEED_GRID, bool CHECKED>
void backward_rows(const CornerTile<acc_t, TAPS, D>& t, const scalar_t* __restrict__ table,
                   scalar_t* __restrict__ gtable, const scalar_t* __restrict__ gout, acc_t* __restrict__ gacc,
                   int64_t c, int64_t S, int64_t P) {
  const scalar_t* row = table + c * S;
  scalar_t* grow = NEED_INPUT ? gtable + c * S : nullptr;
  const scalar_t* gorow = gout + c * P;
#ifdef GRAD_EXT_AVX2_DISPATCH
  if constexpr (std::is_same<scalar_t, float>::value && CornerTile<acc_t, TAPS, D>::K <= 32) {
    if (cpu_has_avx2())
      return RowsAvx2<TAPS, D>::template backward<NEED_INPUT, NEED_GRID, CHECKED>(t, row, grow, gorow, gacc);
  }
#endif
  backward_rows_scalar<scalar_t, acc_t, TAPS, D, NEED_INPUT, NEED_GRID, CHECKED>(t, row, grow, gorow, gacc, 0);
}

}  // namespace cpu
}  // namespace grad_ext
