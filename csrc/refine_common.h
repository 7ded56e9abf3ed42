// Per-pixel arithmetic of GRAD's feature refinement, shared by the CPU and CUDA kernels.
//
// With d = rec - feat, a pixel is described by four channel sums (PixelSums): D2 = sum d^2,
// RR = sum rec^2, FF = sum feat^2, RF = sum rec*feat, plus the MSE indicator. Everything the
// op returns follows from them, because refined - feat = (1 - sim) * d:
//   sim  = w_mse * [D2 / C < k] + w_cos * cos,   a = 1 - sim,
//   map  = |a| * sqrt(D2),   loss = sum over pixels of a^2 * D2, divided by B*C*H*W.
// The cosine is torch.nn.functional.cosine_similarity's: each norm is clamped from below by
// eps in the value, while its gradient is the gradient of the unclamped norm (ATen clamps
// the norms in place under no_grad), i.e. with n = ||x||, c = max(n, eps), P = sum x*y:
//   cos = P / (c_x c_y),   d cos / dx = y / (c_x c_y) - cos / (c_x n_x) * x   (0 when n_x = 0).
#pragma once
#include <cmath>
#include <cstdint>

#include "grid_common.h"

namespace grad_ext {

// F.cosine_similarity's default eps, the one GRAD uses.
constexpr double kCosineEps = 1e-8;

// Rows of the stats tensor (kStatsRows, B, H, W) kept from the forward pass for the backward.
enum StatsRow : int { kSumSqDiff = 0, kSumSqRec = 1, kSumSqFeat = 2, kSumRecFeat = 3, kIndicator = 4 };
constexpr int kStatsRows = 5;

template <typename T>
GE_HD T refine_sqrt(T x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

template <typename T>
struct PixelSums {
  T sq_diff;   // sum_c (rec - feat)^2
  T sq_rec;    // sum_c rec^2
  T sq_feat;   // sum_c feat^2
  T rec_feat;  // sum_c rec * feat
};

template <typename T>
GE_HD void accumulate(PixelSums<T>& s, T r, T f) {
  const T d = r - f;
  s.sq_diff += d * d;
  s.sq_rec += r * r;
  s.sq_feat += f * f;
  s.rec_feat += r * f;
}

template <typename T>
GE_HD void add(PixelSums<T>& s, const PixelSums<T>& other) {
  s.sq_diff += other.sq_diff;
  s.sq_rec += other.sq_rec;
  s.sq_feat += other.sq_feat;
  s.rec_feat += other.rec_feat;
}

template <typename T>
struct Cosine {
  T value;
  T norm_rec, norm_feat;        // ||rec||, ||feat||
  T clamped_rec, clamped_feat;  // max(norm, eps); NaN stays NaN as in clamp_min
};

template <typename T>
GE_HD T clamp_min_eps(T n) {
  const T eps = T(kCosineEps);
  return n < eps ? eps : n;
}

template <typename T>
GE_HD Cosine<T> cosine(const PixelSums<T>& s) {
  Cosine<T> c;
  c.norm_rec = refine_sqrt(s.sq_rec);
  c.norm_feat = refine_sqrt(s.sq_feat);
  c.clamped_rec = clamp_min_eps(c.norm_rec);
  c.clamped_feat = clamp_min_eps(c.norm_feat);
  c.value = s.rec_feat / (c.clamped_rec * c.clamped_feat);
  return c;
}

// 1 when the channel mean of (rec - feat)^2 is strictly below the threshold, else 0.
template <typename T>
GE_HD T mse_indicator(const PixelSums<T>& s, int64_t channels, T threshold) {
  return s.sq_diff / T(channels) < threshold ? T(1) : T(0);
}

template <typename T>
GE_HD T similarity(const Cosine<T>& c, T indicator, T mse_weight, T cos_weight) {
  return mse_weight * indicator + cos_weight * c.value;
}

template <typename T>
struct PixelForward {
  T sim;
  T map;        // |1 - sim| * ||rec - feat||
  T loss_term;  // (1 - sim)^2 * ||rec - feat||^2, summed over pixels then divided by B*C*H*W
};

template <typename T>
GE_HD PixelForward<T> refine_pixel(const PixelSums<T>& s, T indicator, T mse_weight, T cos_weight) {
  PixelForward<T> out;
  out.sim = similarity(cosine(s), indicator, mse_weight, cos_weight);
  const T a = T(1) - out.sim;
  out.map = (a < T(0) ? -a : a) * refine_sqrt(s.sq_diff);
  out.loss_term = a * a * s.sq_diff;
  return out;
}

// Per-channel gradients of one pixel are linear in its channel values:
//   grad_rec  =  alpha * d + beta_rec  * rec  + gamma * feat + a   * grad_refined,
//   grad_feat = -alpha * d + beta_feat * feat + gamma * rec  + sim * grad_refined.
template <typename T>
struct PixelGrad {
  T alpha, beta_rec, beta_feat, gamma;
  T a;    // 1 - sim: d refined / d rec
  T sim;  // d refined / d feat
};

// Upstream gradients of one pixel: grad_sim and grad_map at the pixel, grad_loss already
// divided by B*C*H*W, and refined_dot = sum_c grad_refined * (rec - feat). Missing ones are 0.
// The map's gradient is taken as 0 where it is not differentiable: where ||rec - feat|| = 0
// (for d) and where sim = 1 (for sim, as |.| at 0).
template <typename T>
GE_HD PixelGrad<T> refine_pixel_grad(const PixelSums<T>& s, T indicator, T mse_weight, T cos_weight, T grad_sim,
                                     T grad_map, T grad_loss_scaled, T refined_dot) {
  const Cosine<T> c = cosine(s);
  const T sim = similarity(c, indicator, mse_weight, cos_weight);
  const T a = T(1) - sim;
  const T norm_diff = refine_sqrt(s.sq_diff);
  const T sign_a = a > T(0) ? T(1) : (a < T(0) ? T(-1) : T(0));
  // Gradient with respect to a = 1 - sim from the loss, the map and refined = feat + a * d.
  const T grad_a = grad_loss_scaled * T(2) * a * s.sq_diff + grad_map * sign_a * norm_diff + refined_dot;
  const T grad_cos = cos_weight * (grad_sim - grad_a);
  PixelGrad<T> g;
  g.alpha = grad_loss_scaled * T(2) * a * a;
  if (norm_diff > T(0)) g.alpha += grad_map * sign_a * a / norm_diff;
  g.gamma = grad_cos / (c.clamped_rec * c.clamped_feat);
  g.beta_rec = c.norm_rec > T(0) ? -grad_cos * c.value / (c.clamped_rec * c.norm_rec) : T(0);
  g.beta_feat = c.norm_feat > T(0) ? -grad_cos * c.value / (c.clamped_feat * c.norm_feat) : T(0);
  g.a = a;
  g.sim = sim;
  return g;
}

template <typename T>
GE_HD T grad_rec_value(const PixelGrad<T>& g, T r, T f, T grad_refined) {
  return g.alpha * (r - f) + g.beta_rec * r + g.gamma * f + g.a * grad_refined;
}

template <typename T>
GE_HD T grad_feat_value(const PixelGrad<T>& g, T r, T f, T grad_refined) {
  return g.alpha * (f - r) + g.beta_feat * f + g.gamma * r + g.sim * grad_refined;
}

template <typename T>
GE_HD T refined_value(T sim, T r, T f) {
  return sim * f + (T(1) - sim) * r;
}

}  // namespace grad_ext
