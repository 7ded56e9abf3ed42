// Host-side description and argument checks of a sample_grid call, shared by the CPU and CUDA
// launchers. These are the only checks of the op's arguments: the Python wrapper maps names to
// the enums below and leaves the rest to them, so C++ and Python callers see the same errors
// (TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK_TYPE raises TypeError).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "grid_common.h"
#include "host_common.h"
#include "philox.h"

namespace grad_ext {

enum JitterMode : int { kJitterPerPoint = 0, kJitterPerCall = 1 };

struct GridGeometry {
  int64_t N = 0;     // grid batch
  int64_t N_in = 0;  // input batch: N or 1
  int64_t C = 0;
  int64_t P = 0;  // output points per batch
  int D = 0;      // table dimension
  int64_t S = 1;  // table cells per channel
  int64_t sizes[kMaxDim] = {1, 1, 1, 1};
  int64_t strides[kMaxDim] = {0, 0, 0, 0};
  std::vector<int64_t> out_shape;
};

inline GridGeometry describe_call(const at::Tensor& input, const at::Tensor& grid) {
  TORCH_CHECK_VALUE(input.dim() >= 3 && input.dim() <= 6,
                    "sample_grid: input must have shape (N, C, S_1[, ..., S_4]): 3 to 6 dimensions, got ",
                    input.sizes());
  GridGeometry g;
  g.D = static_cast<int>(input.dim() - 2);
  TORCH_CHECK_VALUE(grid.dim() == g.D + 2, "sample_grid: grid must have ", g.D + 2, " dimensions (N, *out, ", g.D,
                    ") for a ", input.dim(), "-D input, got ", grid.sizes());
  TORCH_CHECK_VALUE(grid.size(-1) == g.D, "sample_grid: grid's last dimension must be ", g.D, " for a ", input.dim(),
                    "-D input, got shape ", grid.sizes());
  g.N = grid.size(0);
  g.N_in = input.size(0);
  TORCH_CHECK_VALUE(g.N_in == g.N || g.N_in == 1, "sample_grid: input batch must be 1 (shared) or equal grid batch ",
                    g.N, ", got input shape ", input.sizes());
  TORCH_CHECK_TYPE(input.is_floating_point() && grid.is_floating_point(),
                   "sample_grid: input and grid must be floating point, got ", input.scalar_type(), " and ",
                   grid.scalar_type());
  TORCH_CHECK_TYPE(input.scalar_type() == grid.scalar_type(),
                   "sample_grid: input and grid must have the same dtype, got ", input.scalar_type(), " and ",
                   grid.scalar_type());
  TORCH_CHECK_VALUE(input.device() == grid.device(), "sample_grid: input and grid must be on the same device, got ",
                    input.device(), " and ", grid.device());
  check_supported_dtype("sample_grid", "input", input, input.is_cuda() ? Backend::kCuda : Backend::kCpu,
                        /*reduced_on_cpu=*/true);
  g.C = input.size(1);
  g.P = 1;
  g.out_shape = {g.N, g.C};
  for (int64_t i = 1; i < grid.dim() - 1; ++i) {
    g.P *= grid.size(i);
    g.out_shape.push_back(grid.size(i));
  }
  int64_t stride = 1;
  for (int a = g.D - 1; a >= 0; --a) {
    g.sizes[a] = input.size(2 + a);
    g.strides[a] = stride;
    stride *= g.sizes[a];
  }
  g.S = stride;
  return g;
}

inline void check_sampling_mode(int64_t interpolation, int64_t padding, int D) {
  TORCH_CHECK_VALUE(interpolation == kBilinear || interpolation == kNearest || interpolation == kBicubic,
                    "sample_grid: interpolation must be 0 (bilinear), 1 (nearest) or 2 (bicubic), got ", interpolation);
  TORCH_CHECK_VALUE(padding == kZeros || padding == kBorder || padding == kReflection,
                    "sample_grid: padding must be 0 (zeros), 1 (border) or 2 (reflection), got ", padding);
  TORCH_CHECK_VALUE(interpolation != kBicubic || D <= kMaxCubicDim,
                    "sample_grid: interpolation 2 (bicubic) supports 1-D to 3-D tables, got a ", D,
                    "-D table (mode='bicubic' needs input of 3 to 5 dimensions)");
}

inline bool jitter_requested(double std, double prob) { return std > 0.0 && prob > 0.0; }

inline void check_jitter_params(const char* op, double std, double prob, int64_t mode) {
  TORCH_CHECK_VALUE(std >= 0.0 && std::isfinite(std), op, ": jitter_std must be finite and >= 0, got ", std);
  TORCH_CHECK_VALUE(prob >= 0.0 && prob <= 1.0, op, ": jitter_prob must be in [0, 1], got ", prob);
  TORCH_CHECK_VALUE(mode == kJitterPerPoint || mode == kJitterPerCall, op,
                    ": jitter_mode must be 0 (pixel) or 1 (batch), got ", mode);
}

inline void check_seed(const char* op, const at::Tensor& seed, const at::Device& device) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": jitter_seed must be an int64 tensor [seed, offset], got ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 2, op, ": jitter_seed must hold 2 elements [seed, offset], got shape ",
                    seed.sizes());
  TORCH_CHECK_VALUE(seed.device() == device, op, ": jitter_seed must be on the input's device ", device, ", got ",
                    seed.device());
}

// The jitter arguments of sample_grid and its backward; returns the contiguous seed tensor,
// undefined when the call does not jitter.
inline at::Tensor check_jitter(double std, double prob, int64_t mode, const c10::optional<at::Tensor>& seed,
                               const at::Tensor& input) {
  check_jitter_params("sample_grid", std, prob, mode);
  if (!jitter_requested(std, prob)) return at::Tensor();
  TORCH_CHECK_VALUE(seed.has_value() && seed->defined(),
                    "sample_grid: jitter needs jitter_seed (an int64 tensor [seed, offset])");
  check_seed("sample_grid", *seed, input.device());
  return seed->contiguous();
}

// Every check of a sample_grid call; backward calls also pass grad_output.
inline GridGeometry check_sample_grid(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                      int64_t padding, double jitter_std, double jitter_prob, int64_t jitter_mode,
                                      const c10::optional<at::Tensor>& jitter_seed, at::Tensor* seed,
                                      const at::Tensor* grad_output = nullptr) {
  GridGeometry g = describe_call(input, grid);
  check_sampling_mode(interpolation, padding, g.D);
  *seed = check_jitter(jitter_std, jitter_prob, jitter_mode, jitter_seed, input);
  if (grad_output != nullptr) {
    TORCH_CHECK_VALUE(grad_output->sizes() == at::IntArrayRef(g.out_shape),
                      "sample_grid_backward: grad_output must have the output's shape ", at::IntArrayRef(g.out_shape),
                      ", got ", grad_output->sizes());
    TORCH_CHECK_TYPE(grad_output->scalar_type() == input.scalar_type(),
                     "sample_grid_backward: grad_output must have dtype ", input.scalar_type(), ", got ",
                     grad_output->scalar_type());
    TORCH_CHECK_VALUE(grad_output->device() == input.device(), "sample_grid_backward: grad_output must be on ",
                      input.device(), ", got ", grad_output->device());
  }
  return g;
}

inline void check_jitter_noise(const at::Tensor& seed, int64_t num_points, int64_t dim, double std, double prob,
                               int64_t mode) {
  TORCH_CHECK_VALUE(num_points >= 0, "jitter_noise: num_points must be >= 0, got ", num_points);
  TORCH_CHECK_VALUE(dim >= 1 && dim <= kMaxDim, "jitter_noise: dim must be 1 to 4, got ", dim);
  check_jitter_params("jitter_noise", std, prob, mode);
  check_seed("jitter_noise", seed, seed.device());
}

// The (seed, offset) pair a jittered call reads; `seed` is a contiguous CPU tensor.
inline JitterParams host_jitter(double std, double prob, int64_t mode, const at::Tensor& seed) {
  if (!seed.defined()) return JitterParams{};
  const int64_t* s = seed.data_ptr<int64_t>();
  return make_jitter(static_cast<float>(std), static_cast<float>(prob), static_cast<int>(mode), s[0], s[1]);
}

}  // namespace grad_ext
