// Host-side checks and allocations of a refine call, shared by the CPU and CUDA launchers: the
// only checks of refine's arguments (TORCH_CHECK_VALUE is a ValueError in Python,
// TORCH_CHECK_TYPE a TypeError).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "host_common.h"
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

inline RefineGeometry describe_refine(const at::Tensor& rec, const at::Tensor& feat, Backend backend) {
  TORCH_CHECK_VALUE(rec.dim() == 4, "refine: rec must have shape (B, C, H, W), got ", rec.sizes());
  TORCH_CHECK_VALUE(feat.dim() == 4, "refine: feat must have shape (B, C, H, W), got ", feat.sizes());
  TORCH_CHECK_VALUE(feat.sizes() == rec.sizes(), "refine: rec and feat must have the same shape, got ", rec.sizes(),
                    " and ", feat.sizes());
  TORCH_CHECK_TYPE(rec.is_floating_point() && feat.is_floating_point(),
                   "refine: rec and feat must be floating point, got ", rec.scalar_type(), " and ", feat.scalar_type());
  TORCH_CHECK_TYPE(feat.scalar_type() == rec.scalar_type(), "refine: rec and feat must have the same dtype, got ",
                   rec.scalar_type(), " and ", feat.scalar_type());
  TORCH_CHECK_VALUE(feat.device() == rec.device(), "refine: rec and feat must be on the same device, got ",
                    rec.device(), " and ", feat.device());
  check_supported_dtype("refine", "rec", rec, backend);
  TORCH_CHECK_VALUE(rec.numel() > 0, "refine: rec and feat must not be empty, got shape ", rec.sizes());
  RefineGeometry g;
  g.B = rec.size(0);
  g.C = rec.size(1);
  g.H = rec.size(2);
  g.W = rec.size(3);
  g.HW = g.H * g.W;
  g.P = g.B * g.HW;
  return g;
}

inline void check_refine_weights(double mse_weight, double cos_weight) {
  TORCH_CHECK_VALUE(std::isfinite(mse_weight), "refine: mse_weight must be finite, got ", mse_weight);
  TORCH_CHECK_VALUE(std::isfinite(cos_weight), "refine: cos_weight must be finite, got ", cos_weight);
}

inline void check_refine_params(double mse_weight, double cos_weight, double mse_threshold) {
  check_refine_weights(mse_weight, cos_weight);
  TORCH_CHECK_VALUE(mse_threshold >= 0.0, "refine: mse_threshold must be >= 0, got ", mse_threshold);
}

// sim, anomaly_map, loss, refined (or an empty tensor) and stats, all contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_refine_outputs(
    const at::Tensor& rec, const RefineGeometry& g, bool return_refined) {
  const auto opts = rec.options().memory_format(at::MemoryFormat::Contiguous);
  return {at::empty({g.B, g.H, g.W}, opts), at::empty({g.B, g.H, g.W}, opts), at::empty({}, opts),
          return_refined ? at::empty({g.B, g.C, g.H, g.W}, opts) : at::empty({0}, opts),
          at::empty({kStatsRows, g.B, g.H, g.W}, opts.dtype(stats_dtype(rec.scalar_type())))};
}

// The gradient of an input, contiguous; an empty tensor when it is not asked for.
inline at::Tensor allocate_refine_grad(const at::Tensor& input, bool requires_grad) {
  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  return requires_grad ? at::empty(input.sizes(), opts) : at::empty({0}, opts);
}

// A defined upstream gradient made contiguous after its shape and dtype are checked; an
// undefined one (the output was not used) stays undefined.
inline at::Tensor upstream_grad(const c10::optional<at::Tensor>& grad, at::IntArrayRef shape, const at::Tensor& rec,
                                const char* name) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(grad->sizes() == shape, "refine_backward: ", name, " must have shape ", shape, ", got ",
                    grad->sizes());
  TORCH_CHECK_TYPE(grad->scalar_type() == rec.scalar_type(), "refine_backward: ", name, " must have dtype ",
                   rec.scalar_type(), ", got ", grad->scalar_type());
  TORCH_CHECK_VALUE(grad->device() == rec.device(), "refine_backward: ", name, " must be on ", rec.device(), ", got ",
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
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({kStatsRows, g.B, g.H, g.W}) &&
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
