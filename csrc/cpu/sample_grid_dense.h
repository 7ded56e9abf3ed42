#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <vector>

#include "cpu/sample_grid_rows.h"
#include "sample_grid.h"

namespace grad_ext {
namespace cpu {

// ---- Small shared tables read by one point per image, or by one image of points ---------
// The global grid of GRAD: one (1, C, r, r) table with C in the hundred thousands and only
// S = r^D cells per channel, sampled at Q = N * P points with N == 1 or P == 1. Every output
// is then a matrix product with the dense S x Q weight matrix W (K nonzeros per column):
//   forward   out (C x Q) = T (C x S) @ W
//   backward  dT (C x S) = dOut (C x Q) @ W^T,   M (S x Q) = T^T @ dOut,
//             dgrid[q, a] = sum_k dW_k/da[q] * M[off_k(q), q].
// Doing S / K times the multiply-adds of the gather/scatter loops, but in BLAS, is several
// times faster while S <= kDenseMaxCellsPerCorner * K, and it has no scatter conflicts.
constexpr int64_t kDenseMaxCellsPerCorner = 4;
constexpr int64_t kDenseMinChannels = 256;

inline bool dense_eligible(const GridGeometry& g, int interpolation) {
  const int64_t K = int64_t(1) << g.D;
  return interpolation == kBilinear && g.N_in == 1 && (g.N == 1 || g.P == 1) && g.S <= kDenseMaxCellsPerCorner * K &&
         g.C >= kDenseMinChannels;
}

// Corners of all Q points; false when a point has a non-finite bias (the sparse kernels
// handle those points).
template <typename scalar_t, int D>
bool dense_corners(const at::Tensor& grid, const GridGeometry& g, int padding, bool align_corners,
                   const JitterParams& jitter, bool with_grad,
                   std::vector<PointCorners<at::opmath_type<scalar_t>, D>>& corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = g.N * g.P;
  const NonFinitePolicy policy = cpu_policy(D);
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  corners.resize(Q);
  for (int64_t q = 0; q < Q; ++q) {
    point_corners<scalar_t, D>(gr, q, g, kBilinear, padding, align_corners, policy, jitter, with_grad, corners[q]);
    if (!(corners[q].bias == acc_t(0))) return false;
  }
  return true;
}

template <typename scalar_t, int D>
at::Tensor dense_weights(const std::vector<PointCorners<at::opmath_type<scalar_t>, D>>& corners, const GridGeometry& g,
                         const at::TensorOptions& options) {
  const int64_t Q = static_cast<int64_t>(corners.size());
  at::Tensor W = at::zeros({g.S, Q}, options);
  scalar_t* w = W.data_ptr<scalar_t>();
  for (int64_t q = 0; q < Q; ++q) {
    const auto& pc = corners[q];
    for (int k = 0; k < (1 << D); ++k)
      if (pc.valid >> k & 1u) w[pc.offset[k] * Q + q] += static_cast<scalar_t>(pc.weight[k]);
  }
  return W;
}

// (C x Q) view of an output-shaped tensor: (1, C, P) when N == 1, the transpose of (N, C) when P == 1.
inline at::Tensor channels_by_points(const at::Tensor& t, const GridGeometry& g) {
  return g.N == 1 ? t.view({g.C, g.P}) : t.view({g.N, g.C}).t();
}

template <typename scalar_t, int D>
bool dense_forward(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const GridGeometry& g, int padding,
                   bool align_corners, const JitterParams& jitter) {
  std::vector<PointCorners<at::opmath_type<scalar_t>, D>> corners;
  if (!dense_corners<scalar_t, D>(grid, g, padding, align_corners, jitter, false, corners)) return false;
  const at::Tensor W = dense_weights<scalar_t, D>(corners, g, input.options());
  const at::Tensor T = input.view({g.C, g.S});
  if (g.N == 1) {
    at::Tensor out_view = out.view({g.C, g.P});
    at::mm_out(out_view, T, W);
  } else {
    at::Tensor out_view = out.view({g.N, g.C});
    at::mm_out(out_view, W.t(), T.t());
  }
  return true;
}

template <typename scalar_t, int D>
bool dense_backward(const at::Tensor& gout, const at::Tensor& input, const at::Tensor& grid, at::Tensor& grad_input,
                    at::Tensor& grad_grid, const GridGeometry& g, int padding, bool align_corners,
                    const JitterParams& jitter, bool need_input, bool need_grid) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<PointCorners<acc_t, D>> corners;
  if (!dense_corners<scalar_t, D>(grid, g, padding, align_corners, jitter, need_grid, corners)) return false;
  const at::Tensor G = channels_by_points(gout, g);
  const at::Tensor T = input.view({g.C, g.S});
  if (need_input) {
    const at::Tensor W = dense_weights<scalar_t, D>(corners, g, input.options());
    at::Tensor grad_view = grad_input.view({g.C, g.S});
    at::mm_out(grad_view, G, W.t());
  }
  if (!need_grid) return true;
  const at::Tensor M = at::mm(T.t(), G).contiguous();  // (S, Q)
  const scalar_t* m = M.data_ptr<scalar_t>();
  scalar_t* gg = grad_grid.data_ptr<scalar_t>();
  const int64_t Q = g.N * g.P;
  for (int64_t q = 0; q < Q; ++q) {
    const auto& pc = corners[q];
    for (int a = 0; a < D; ++a) {
      acc_t s = pc.grad_bias[a];
      for (int k = 0; k < (1 << D); ++k)
        if (pc.valid >> k & 1u) s += corner_weight_grad(pc, k, a) * static_cast<acc_t>(m[pc.offset[k] * Q + q]);
      gg[q * D + (D - 1 - a)] = static_cast<scalar_t>(s * pc.mult[a]);
    }
  }
  return true;
}

}  // namespace cpu
}  // namespace grad_ext
