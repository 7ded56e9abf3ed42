// Host-side checks and allocations of a refine call, shared by the CPU and CUDA launchers.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "huge_pages.h"
#include "refine_common.h"

namespace grad_ext {

struct RefineGeometry {
  int64_t B = 0, C = 0, H = 0, W = 0;
  int64_t HW = 0;  // pixels per image
  int64_t P = 0;   // pixels in the batch
  int64_t numel() const { return B * C * HW; }
};

// The per-pixel sums are kept in float32 for float32/float16/bfloat16, float64 for float64.
inline at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline RefineGeometry describe_refine(const at::Tensor& rec, const at::Tensor& feat) {
  TORCH_CHECK(rec.dim() == 4, "refine: rec must be 4-D (B, C, H, W), got ", rec.sizes());
  TORCH_CHECK(feat.sizes() == rec.sizes(), "refine: feat must have rec's shape ", rec.sizes(), ", got ",
              feat.sizes());
  TORCH_CHECK(feat.scalar_type() == rec.scalar_type(), "refine: rec and feat must have the same dtype, got ",
              rec.scalar_type(), " and ", feat.scalar_type());
  TORCH_CHECK(feat.device() == rec.device(), "refine: rec and feat must be on the same device, got ", rec.device(),
              " and ", feat.device());
  TORCH_CHECK(rec.numel() > 0, "refine: rec and feat must not be empty, got shape ", rec.sizes());
  RefineGeometry g;
  g.B = rec.size(0);
  g.C = rec.size(1);
  g.H = rec.size(2);
  g.W = rec.size(3);
  g.HW = g.H * g.W;
  g.P = g.B * g.HW;
  return g;
}

inline void check_refine_params(double mse_threshold) {
  TORCH_CHECK(mse_threshold >= 0.0, "refine: mse_threshold must be >= 0, got ", mse_threshold);
}

// sim, anomaly_map, loss, refined (or an empty tensor) and stats, all contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_refine_outputs(
    const at::Tensor& rec, const RefineGeometry& g, bool return_refined) {
  const auto opts = rec.options().memory_format(at::MemoryFormat::Contiguous);
  return {at::empty({g.B, g.H, g.W}, opts), at::empty({g.B, g.H, g.W}, opts), at::empty({}, opts),
          return_refined ? empty_output({g.B, g.C, g.H, g.W}, opts) : at::empty({0}, opts),
          at::empty({kStatsRows, g.B, g.H, g.W}, opts.dtype(stats_dtype(rec.scalar_type())))};
}

// The gradient of an input, contiguous; an empty tensor when it is not asked for.
inline at::Tensor allocate_refine_grad(const at::Tensor& input, bool requires_grad) {
  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  return requires_grad ? empty_output(input.sizes(), opts) : at::empty({0}, opts);
}

// A defined upstream gradient made contiguous after its shape and dtype are checked; an
// undefined one (the output was not used) stays undefined.
inline at::Tensor upstream_grad(const c10::optional<at::Tensor>& grad, at::IntArrayRef shape, const at::Tensor& rec,
                                const char* name) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  TORCH_CHECK(grad->sizes() == shape, "refine_backward: ", name, " must have shape ", shape, ", got ", grad->sizes());
  TORCH_CHECK(grad->scalar_type() == rec.scalar_type(), "refine_backward: ", name, " must have dtype ",
              rec.scalar_type(), ", got ", grad->scalar_type());
  TORCH_CHECK(grad->device() == rec.device(), "refine_backward: ", name, " must be on ", rec.device(), ", got ",
              grad->device());
  return grad->contiguous();
}

struct RefineUpstream {
  at::Tensor sim, map, loss, refined;  // undefined where no gradient flows
};

inline RefineUpstream check_refine_backward(const c10::optional<at::Tensor>& grad_sim,
                                            const c10::optional<at::Tensor>& grad_map,
                                            const c10::optional<at::Tensor>& grad_loss,
                                            const c10::optional<at::Tensor>& grad_refined, const at::Tensor& rec,
                                            const at::Tensor& stats, const RefineGeometry& g) {
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({kStatsRows, g.B, g.H, g.W}) &&
                  stats.scalar_type() == stats_dtype(rec.scalar_type()) && stats.device() == rec.device(),
              "refine_backward: stats must be the ", stats_dtype(rec.scalar_type()), " tensor (", kStatsRows,
              ", B, H, W) returned by refine, got ", stats.scalar_type(), " ", stats.sizes());
  RefineUpstream up;
  up.sim = upstream_grad(grad_sim, {g.B, g.H, g.W}, rec, "grad_sim");
  up.map = upstream_grad(grad_map, {g.B, g.H, g.W}, rec, "grad_map");
  up.loss = upstream_grad(grad_loss, {}, rec, "grad_loss");
  up.refined = upstream_grad(grad_refined, {g.B, g.C, g.H, g.W}, rec, "grad_refined");
  return up;
}

}  // namespace grad_ext
