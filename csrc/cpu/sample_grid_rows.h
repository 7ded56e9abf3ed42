// Row loops of the CPU sample_grid: for each channel row of the table, the tile's points in
// turn (tables too large for cache, read by few corners per cell).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "grid_common.h"
#include "philox.h"
#include "sample_grid.h"

namespace grad_ext {
namespace cpu {

// Points per tile: their corners are set up once for all channels of a task.
constexpr int64_t kPointTile = 128;

// Corner setup of one point, with the jitter added to its coordinates.
template <typename scalar_t, int D, int TAPS>
void point_corners(const scalar_t* grid, int64_t point, const GridGeometry& g, int interpolation,
                   int padding, bool align_corners, const NonFinitePolicy& policy,
                   const JitterParams& jitter, bool with_grad,
                   PointCorners<at::opmath_type<scalar_t>, D, TAPS>& pc) {
  using acc_t = at::opmath_type<scalar_t>;
  float noise[4];
  jitter_point(jitter, point, noise);
  acc_t coords[D];
  for (int k = 0; k < D; ++k) coords[k] = static_cast<acc_t>(grid[point * D + k]) + static_cast<acc_t>(noise[k]);
  setup_corners<acc_t, D, TAPS>(coords, g.sizes, g.strides, interpolation, padding, align_corners, policy,
                          with_grad, pc);
}

// Corners (taps) of a tile of points in structure-of-arrays form, so the per-channel loops
// below run over points with compile-time corner counts: K = TAPS^D (TAPS = 1 nearest, 2
// bilinear, 4 bicubic). Invalid corners get weight 0 and offset 0; a tile where any point has
// an invalid corner (or a non-finite bias) takes the checked path.
template <typename acc_t, int TAPS, int D>
struct CornerTile {
  static constexpr int K = Pow<TAPS, D>::value;
  typedef typename TapMask<K>::type Mask;
  int64_t off[K][kPointTile];
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
        off[k][i] = ok ? pc.offset[k] : 0;
        w[k][i] = ok ? pc.weight[k] : acc_t(0);
        if (with_grad)
          for (int a = 0; a < D; ++a) dw[k][a][i] = ok ? corner_weight_grad(pc, k, a) : acc_t(0);
      }
    }
  }
};

template <typename scalar_t, typename acc_t, int TAPS, int D, bool CHECKED>
void forward_rows(const CornerTile<acc_t, TAPS, D>& t, const scalar_t* __restrict__ table, scalar_t* __restrict__ out,
                  int64_t c0, int64_t c1, int64_t S, int64_t P) {
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* __restrict__ row = table + c * S;
    scalar_t* __restrict__ orow = out + c * P;
    for (int64_t i = 0; i < t.count; ++i) {
      acc_t acc = CHECKED ? t.bias[i] : acc_t(0);
      for (int k = 0; k < CornerTile<acc_t, TAPS, D>::K; ++k) {
        if (CHECKED && !(t.valid[i] >> k & 1u)) continue;
        acc += t.w[k][i] * static_cast<acc_t>(row[t.off[k][i]]);
      }
      orow[i] = static_cast<scalar_t>(acc);
    }
  }
}

// Accumulates one tile of points over channels [c0, c1): the input gradient into whole rows
// (owned by the calling task) and the grid gradient per point into gacc[a][i].
template <typename scalar_t, typename acc_t, int TAPS, int D, bool NEED_INPUT, bool NEED_GRID, bool CHECKED>
void backward_rows(const CornerTile<acc_t, TAPS, D>& t, const scalar_t* __restrict__ table,
                   scalar_t* __restrict__ gtable, const scalar_t* __restrict__ gout, acc_t* __restrict__ gacc,
                   int64_t c0, int64_t c1, int64_t S, int64_t P) {
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* __restrict__ row = table + c * S;
    scalar_t* __restrict__ grow = NEED_INPUT ? gtable + c * S : nullptr;
    const scalar_t* __restrict__ gorow = gout + c * P;
    for (int64_t i = 0; i < t.count; ++i) {
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
}

}  // namespace cpu
}  // namespace grad_ext
