// The schemas of grad_ext's kernel ops, written once: the operator library defines them under
// the namespace grad_ext (ops.cpp) and the CUDA emulation under grad_ext_emulated, whose CPU
// kernels are the CUDA kernels run by the emulation (cuda/emulation/library.cpp).
#pragma once
#include <torch/library.h>

namespace grad_ext {

inline void define_kernel_ops(torch::Library& m) {
  // Multilinear, nearest or cubic sampling of a d-dimensional table, d = 1..4 (cubic: 1..3).
  //   input (N_in, C, S_1, ..., S_d) with N_in == N or N_in == 1 (shared by every batch),
  //   grid (N, O_1, ..., O_k, d) -> output (N, C, O_1, ..., O_k).
  // interpolation: 0 bilinear, 1 nearest, 2 bicubic. padding: 0 zeros, 1 border, 2 reflection.
  // dtypes: float32, float64, float16, bfloat16 (the last two computed in float32).
  // Jitter: when jitter_std > 0 and jitter_prob > 0, N(0, std^2) noise drawn by Philox from
  // jitter_seed = int64 tensor [seed, offset] is added to the coordinates of each jittered
  // point (jitter_mode 0: each point with probability p; 1: the whole call with probability p).
  m.def(
      "sample_grid(Tensor input, Tensor grid, int interpolation, int padding, bool align_corners, "
      "float jitter_std, float jitter_prob, int jitter_mode, Tensor? jitter_seed) -> Tensor");
  m.def(
      "sample_grid_backward(Tensor grad_output, Tensor input, Tensor grid, int interpolation, "
      "int padding, bool align_corners, float jitter_std, float jitter_prob, int jitter_mode, "
      "Tensor? jitter_seed, bool input_requires_grad, bool grid_requires_grad) -> (Tensor, Tensor)");
  // The noise (num_points, dim) and the jittered flags (num_points,) that sample_grid uses for
  // the given seed tensor; computed on the seed's device.
  m.def(
      "jitter_noise(Tensor jitter_seed, int num_points, int dim, float jitter_std, float jitter_prob, "
      "int jitter_mode) -> (Tensor, Tensor)");
  // Feature refinement of GRAD on (B, C, H, W): returns sim (B,H,W), anomaly_map (B,H,W),
  // loss (scalar), refined (B,C,H,W) or an empty tensor, and stats (per-pixel sums kept for
  // the backward pass).
  m.def(
      "refine(Tensor rec, Tensor feat, float mse_weight, float cos_weight, float mse_threshold, "
      "bool return_refined) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "refine_backward(Tensor? grad_sim, Tensor? grad_map, Tensor? grad_loss, Tensor? grad_refined, "
      "Tensor rec, Tensor feat, Tensor stats, float mse_weight, float cos_weight, "
      "bool rec_requires_grad, bool feat_requires_grad) -> (Tensor, Tensor)");
}

}  // namespace grad_ext
