// The launchers of sample_grid's CUDA kernels, compiled once per dtype (sample_grid_<dtype>.cu,
// so the instantiations build in parallel); the op's entry points are in sample_grid.cu.
#pragma once
#include <ATen/ATen.h>

#include "cuda/runtime.h"
#include "sample_grid.h"

namespace grad_ext {
namespace cuda {

// One sample_grid call as the launchers see it: contiguous tensors, checked geometry.
struct SampleCall {
  GridGeometry g;
  int64_t interpolation, padding;
  bool align_corners;
  double jitter_std, jitter_prob;
  int64_t jitter_mode;
  at::Tensor seed;  // device [seed, offset], or undefined without jitter
  Stream stream;
};

// The backward pass's tensors and what the launchers fill in.
struct BackwardBuffers {
  at::Tensor grad_input, grad_grid;  // the op's outputs; undefined where not computed
  at::Tensor grid_partial;           // [N * P][parts][D] acc_t, reduced by reduce_grid_kernel
  int64_t grid_parts = 0;
};

// out = sample_grid(input, grid) for input's dtype scalar_t.
template <typename scalar_t>
void forward_typed(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const SampleCall& call);

// Fills buf.grad_input (need_input) and buf.grad_grid (need_grid: bilinear and bicubic).
template <typename scalar_t>
void backward_typed(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid,
                    BackwardBuffers& buf, const SampleCall& call, bool need_input, bool need_grid, bool deterministic);

}  // namespace cuda
}  // namespace grad_ext
