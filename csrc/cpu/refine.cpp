// CPU kernels of refine. A task owns a tile of consecutive pixels of one image; for each
// channel it walks the tile's contiguous row segment, so the per-pixel accumulators live in
// small arrays the compiler vectorises over. The loss is summed per tile into a fixed slot
// and the slots are added in order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "refine.h"
#include "refine_common.h"

namespace grad_ext {
namespace {

constexpr int64_t kPixelTile = 64;

struct Tiling {
  int64_t per_image = 0;
  int64_t count = 0;
};

Tiling make_tiling(const RefineGeometry& g) {
  Tiling t;
  t.per_image = (g.HW + kPixelTile - 1) / kPixelTile;
  t.count = g.B * t.per_image;
  return t;
}

// Offset of the tile's first pixel in channel 0 of image b, and its pixel index in the batch.
struct Tile {
  int64_t b, s0, n;
};

Tile tile_at(int64_t task, const Tiling& t, const RefineGeometry& g) {
  Tile tile;
  tile.b = task / t.per_image;
  tile.s0 = (task % t.per_image) * kPixelTile;
  tile.n = std::min(kPixelTile, g.HW - tile.s0);
  return tile;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* rec, const scalar_t* feat, const RefineGeometry& g, double mse_weight_,
                    double cos_weight_, double threshold_, scalar_t* sim_out, scalar_t* map_out, scalar_t* loss_out,
                    scalar_t* refined, at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t mse_weight = static_cast<acc_t>(mse_weight_), cos_weight = static_cast<acc_t>(cos_weight_);
  const acc_t threshold = static_cast<acc_t>(threshold_);
  const Tiling tiling = make_tiling(g);
  std::vector<acc_t> loss_partials(tiling.count);

  at::parallel_for(0, tiling.count, 1, [&](int64_t begin, int64_t end) {
    acc_t sq_diff[kPixelTile], sq_rec[kPixelTile], sq_feat[kPixelTile], rec_feat[kPixelTile], sim[kPixelTile];
    for (int64_t task = begin; task < end; ++task) {
      const Tile t = tile_at(task, tiling, g);
      const int64_t n = t.n;
      std::fill(sq_diff, sq_diff + n, acc_t(0));
      std::fill(sq_rec, sq_rec + n, acc_t(0));
      std::fill(sq_feat, sq_feat + n, acc_t(0));
      std::fill(rec_feat, rec_feat + n, acc_t(0));
      const int64_t base = t.b * g.C * g.HW + t.s0;
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* r = rec + base + c * g.HW;
        const scalar_t* f = feat + base + c * g.HW;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t x = static_cast<acc_t>(r[i]), y = static_cast<acc_t>(f[i]);
          const acc_t d = x - y;
          sq_diff[i] += d * d;
          sq_rec[i] += x * x;
          sq_feat[i] += y * y;
          rec_feat[i] += x * y;
        }
      }
      const int64_t p0 = t.b * g.HW + t.s0;  // first pixel of the tile in (B, H, W)
      acc_t loss = 0;
      for (int64_t i = 0; i < n; ++i) {
        const PixelSums<acc_t> s{sq_diff[i], sq_rec[i], sq_feat[i], rec_feat[i]};
        const acc_t indicator = mse_indicator(s, g.C, threshold);
        const PixelForward<acc_t> out = refine_pixel(s, indicator, mse_weight, cos_weight);
        sim[i] = out.sim;
        sim_out[p0 + i] = static_cast<scalar_t>(out.sim);
        map_out[p0 + i] = static_cast<scalar_t>(out.map);
        loss += out.loss_term;
        stats[kSumSqDiff * g.P + p0 + i] = s.sq_diff;
        stats[kSumSqRec * g.P + p0 + i] = s.sq_rec;
        stats[kSumSqFeat * g.P + p0 + i] = s.sq_feat;
        stats[kSumRecFeat * g.P + p0 + i] = s.rec_feat;
        stats[kIndicator * g.P + p0 + i] = indicator;
      }
      loss_partials[task] = loss;
      if (refined == nullptr) continue;
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* r = rec + base + c * g.HW;
        const scalar_t* f = feat + base + c * g.HW;
        scalar_t* o = refined + base + c * g.HW;
        for (int64_t i = 0; i < n; ++i) {
          o[i] = static_cast<scalar_t>(refined_value(sim[i], static_cast<acc_t>(r[i]), static_cast<acc_t>(f[i])));
        }
      }
    }
  });

  double total = 0;
  for (const acc_t v : loss_partials) total += static_cast<double>(v);
  *loss_out = static_cast<scalar_t>(total / static_cast<double>(g.numel()));
}

// A tile's gradient coefficients as arrays (one entry per pixel), so the channel loops vectorise.
template <typename acc_t>
struct TileGrad {
  acc_t alpha[kPixelTile], beta_rec[kPixelTile], beta_feat[kPixelTile], gamma[kPixelTile], a[kPixelTile],
      sim[kPixelTile];
  void set(int64_t i, const PixelGrad<acc_t>& g) {
    alpha[i] = g.alpha;
    beta_rec[i] = g.beta_rec;
    beta_feat[i] = g.beta_feat;
    gamma[i] = g.gamma;
    a[i] = g.a;
    sim[i] = g.sim;
  }
  PixelGrad<acc_t> get(int64_t i) const { return {alpha[i], beta_rec[i], beta_feat[i], gamma[i], a[i], sim[i]}; }
};

// One channel row segment of grad_rec and/or grad_feat (either may be null).
template <bool kWithRefinedGrad, typename scalar_t, typename acc_t>
void write_grad_row(const TileGrad<acc_t>& tg, const scalar_t* r, const scalar_t* f, const scalar_t* gr,
                    scalar_t* grad_rec, scalar_t* grad_feat, int64_t n) {
  if (grad_rec != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t gref = kWithRefinedGrad ? static_cast<acc_t>(gr[i]) : acc_t(0);
      grad_rec[i] =
          static_cast<scalar_t>(grad_rec_value(tg.get(i), static_cast<acc_t>(r[i]), static_cast<acc_t>(f[i]), gref));
    }
  }
  if (grad_feat != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t gref = kWithRefinedGrad ? static_cast<acc_t>(gr[i]) : acc_t(0);
      grad_feat[i] =
          static_cast<scalar_t>(grad_feat_value(tg.get(i), static_cast<acc_t>(r[i]), static_cast<acc_t>(f[i]), gref));
    }
  }
}

template <typename scalar_t>
void backward_kernel(const RefineUpstream& up, const scalar_t* rec, const scalar_t* feat,
                     const at::opmath_type<scalar_t>* stats, const RefineGeometry& g, double mse_weight_,
                     double cos_weight_, scalar_t* grad_rec, scalar_t* grad_feat) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t mse_weight = static_cast<acc_t>(mse_weight_), cos_weight = static_cast<acc_t>(cos_weight_);
  const scalar_t* g_sim = up.sim.defined() ? up.sim.data_ptr<scalar_t>() : nullptr;
  const scalar_t* g_map = up.map.defined() ? up.map.data_ptr<scalar_t>() : nullptr;
  const scalar_t* g_ref = up.refined.defined() ? up.refined.data_ptr<scalar_t>() : nullptr;
  const acc_t g_loss =
      up.loss.defined() ? static_cast<acc_t>(*up.loss.data_ptr<scalar_t>()) / static_cast<acc_t>(g.numel()) : acc_t(0);
  const Tiling tiling = make_tiling(g);

  at::parallel_for(0, tiling.count, 1, [&](int64_t begin, int64_t end) {
    acc_t dot[kPixelTile];
    TileGrad<acc_t> tg;
    for (int64_t task = begin; task < end; ++task) {
      const Tile t = tile_at(task, tiling, g);
      const int64_t n = t.n;
      const int64_t base = t.b * g.C * g.HW + t.s0;
      const int64_t p0 = t.b * g.HW + t.s0;
      std::fill(dot, dot + n, acc_t(0));
      if (g_ref != nullptr) {
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* r = rec + base + c * g.HW;
          const scalar_t* f = feat + base + c * g.HW;
          const scalar_t* gr = g_ref + base + c * g.HW;
          for (int64_t i = 0; i < n; ++i) {
            dot[i] += static_cast<acc_t>(gr[i]) * (static_cast<acc_t>(r[i]) - static_cast<acc_t>(f[i]));
          }
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = p0 + i;
        const PixelSums<acc_t> s{stats[kSumSqDiff * g.P + p], stats[kSumSqRec * g.P + p], stats[kSumSqFeat * g.P + p],
                                 stats[kSumRecFeat * g.P + p]};
        tg.set(i, refine_pixel_grad(s, stats[kIndicator * g.P + p], mse_weight, cos_weight,
                                    g_sim ? static_cast<acc_t>(g_sim[p]) : acc_t(0),
                                    g_map ? static_cast<acc_t>(g_map[p]) : acc_t(0), g_loss, dot[i]));
      }
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t off = base + c * g.HW;
        scalar_t* o_rec = grad_rec ? grad_rec + off : nullptr;
        scalar_t* o_feat = grad_feat ? grad_feat + off : nullptr;
        if (g_ref != nullptr) {
          write_grad_row<true>(tg, rec + off, feat + off, g_ref + off, o_rec, o_feat, n);
        } else {
          write_grad_row<false>(tg, rec + off, feat + off, g_ref, o_rec, o_feat, n);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> refine_cpu(const at::Tensor& rec_,
                                                                                  const at::Tensor& feat_,
                                                                                  double mse_weight, double cos_weight,
                                                                                  double mse_threshold,
                                                                                  bool return_refined) {
  const RefineGeometry g = describe_refine(rec_, feat_, Backend::kCpu);
  check_refine_params(mse_weight, cos_weight, mse_threshold);
  auto outputs = allocate_refine_outputs(rec_, g, return_refined);
  at::Tensor sim = std::get<0>(outputs), map = std::get<1>(outputs), loss = std::get<2>(outputs),
             refined = std::get<3>(outputs), stats = std::get<4>(outputs);
  const at::Tensor rec = rec_.contiguous(), feat = feat_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(rec.scalar_type(), "refine_cpu", [&] {
    forward_kernel<scalar_t>(rec.data_ptr<scalar_t>(), feat.data_ptr<scalar_t>(), g, mse_weight, cos_weight,
                             mse_threshold, sim.data_ptr<scalar_t>(), map.data_ptr<scalar_t>(),
                             loss.data_ptr<scalar_t>(), return_refined ? refined.data_ptr<scalar_t>() : nullptr,
                             stats.data_ptr<at::opmath_type<scalar_t>>());
  });
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> refine_backward_cpu(const c10::optional<at::Tensor>& grad_sim,
                                                       const c10::optional<at::Tensor>& grad_map,
                                                       const c10::optional<at::Tensor>& grad_loss,
                                                       const c10::optional<at::Tensor>& grad_refined,
                                                       const at::Tensor& rec_, const at::Tensor& feat_,
                                                       const at::Tensor& stats_, double mse_weight, double cos_weight,
                                                       bool rec_requires_grad, bool feat_requires_grad) {
  const RefineGeometry g = describe_refine(rec_, feat_, Backend::kCpu);
  check_refine_weights(mse_weight, cos_weight);
  const RefineUpstream up = check_refine_backward(grad_sim, grad_map, grad_loss, grad_refined, rec_, stats_, g);
  at::Tensor grad_rec = allocate_refine_grad(rec_, rec_requires_grad);
  at::Tensor grad_feat = allocate_refine_grad(feat_, feat_requires_grad);
  if (!rec_requires_grad && !feat_requires_grad) return {grad_rec, grad_feat};
  const at::Tensor rec = rec_.contiguous(), feat = feat_.contiguous(), stats = stats_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(rec.scalar_type(), "refine_backward_cpu", [&] {
    backward_kernel<scalar_t>(up, rec.data_ptr<scalar_t>(), feat.data_ptr<scalar_t>(),
                              stats.data_ptr<at::opmath_type<scalar_t>>(), g, mse_weight, cos_weight,
                              rec_requires_grad ? grad_rec.data_ptr<scalar_t>() : nullptr,
                              feat_requires_grad ? grad_feat.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_rec, grad_feat};
}

}  // namespace

TORCH_LIBRARY_IMPL(grad_ext, CPU, m) {
  m.impl("refine", &refine_cpu);
  m.impl("refine_backward", &refine_backward_cpu);
}

}  // namespace grad_ext
