// Host-side description of a sample_grid call, shared by the CPU and CUDA launchers.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "grid_common.h"
#include "philox.h"

namespace grad_ext {

struct GridGeometry {
  int64_t N = 0;     // grid batch
  int64_t N_in = 0;  // input batch: N or 1
  int64_t C = 0;
  int64_t P = 0;     // output points per batch
  int D = 0;         // table dimension
  int64_t S = 1;     // table cells per channel
  int64_t sizes[kMaxDim] = {1, 1, 1, 1};
  int64_t strides[kMaxDim] = {0, 0, 0, 0};
  std::vector<int64_t> out_shape;
};

inline GridGeometry describe_call(const at::Tensor& input, const at::Tensor& grid) {
  TORCH_CHECK(input.dim() >= 3 && input.dim() <= 6,
              "sample_grid: input must have 3 to 6 dimensions (N, C, spatial...), got ", input.sizes());
  GridGeometry g;
  g.D = static_cast<int>(input.dim() - 2);
  TORCH_CHECK(grid.dim() == g.D + 2, "sample_grid: grid must have ", g.D + 2,
              " dimensions for a ", input.dim(), "-D input, got ", grid.sizes());
  TORCH_CHECK(grid.size(-1) == g.D, "sample_grid: grid's last dimension must be ", g.D,
              " for a ", input.dim(), "-D input, got ", grid.size(-1));
  g.N = grid.size(0);
  g.N_in = input.size(0);
  TORCH_CHECK(g.N_in == g.N || g.N_in == 1, "sample_grid: input batch must be 1 or equal the grid batch ",
              g.N, ", got ", g.N_in);
  TORCH_CHECK(input.scalar_type() == grid.scalar_type(),
              "sample_grid: input and grid must have the same dtype, got ", input.scalar_type(), " and ",
              grid.scalar_type());
  TORCH_CHECK(input.device() == grid.device(), "sample_grid: input and grid must be on the same device, got ",
              input.device(), " and ", grid.device());
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

inline bool jitter_requested(double std, double prob) { return std > 0.0 && prob > 0.0; }

inline void check_jitter(double std, double prob, int64_t mode, const c10::optional<at::Tensor>& seed,
                         const at::Tensor& input) {
  TORCH_CHECK(std >= 0.0, "sample_grid: jitter_std must be >= 0, got ", std);
  TORCH_CHECK(prob >= 0.0 && prob <= 1.0, "sample_grid: jitter_prob must be in [0, 1], got ", prob);
  TORCH_CHECK(mode == 0 || mode == 1, "sample_grid: jitter_mode must be 0 (pixel) or 1 (batch), got ", mode);
  if (jitter_requested(std, prob)) {
    TORCH_CHECK(seed.has_value() && seed->defined(), "sample_grid: jitter needs jitter_seed");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2,
                "sample_grid: jitter_seed must be an int64 tensor of 2 elements [seed, offset]");
    TORCH_CHECK(seed->device() == input.device(), "sample_grid: jitter_seed must be on the input's device ",
                input.device(), ", got ", seed->device());
  }
}

}  // namespace grad_ext
