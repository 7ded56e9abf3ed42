// CUDA entry points of sample_grid and jitter_noise: checks, allocation and the dtype dispatch
// to the launchers (sample_grid_launch.cuh, compiled per dtype in sample_grid_<dtype>.cu).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <climits>

#include "cuda/runtime.h"
#include "cuda/sample_grid_kernels.cuh"  // KernelGeometry, SampleParams, device_jitter
#include "cuda/sample_grid_launch.h"
#include "sample_grid.h"

namespace grad_ext {
namespace {

using namespace grad_ext::cuda;

constexpr int kNoiseThreads = 256;

__global__ void jitter_noise_kernel(const int64_t* __restrict__ seed, int64_t num_points, int dim, float std,
                                    float prob, int mode, float* __restrict__ noise, bool* __restrict__ flags) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= num_points) return;
  const JitterParams j = make_jitter(std, prob, mode, seed[0], seed[1]);
  float v[4];
  flags[i] = jitter_point(j, i, v);
  for (int k = 0; k < dim; ++k) noise[i * dim + k] = v[k];
}

SampleCall make_call(const GridGeometry& g, const at::Tensor& seed, int64_t interpolation, int64_t padding,
                     bool align_corners, double jitter_std, double jitter_prob, int64_t jitter_mode) {
  return SampleCall{g,           interpolation, padding, align_corners,   jitter_std,
                    jitter_prob, jitter_mode,   seed,    current_stream()};
}

at::Tensor sample_grid_cuda(const at::Tensor& input_, const at::Tensor& grid_, int64_t interpolation, int64_t padding,
                            bool align_corners, double jitter_std, double jitter_prob, int64_t jitter_mode,
                            const c10::optional<at::Tensor>& jitter_seed) {
  at::Tensor seed;
  const GridGeometry g = check_sample_grid(input_, grid_, interpolation, padding, jitter_std, jitter_prob, jitter_mode,
                                           jitter_seed, &seed);
  DeviceGuard guard(input_.device());
  at::Tensor out = at::empty(g.out_shape, input_.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous();
  const SampleCall call =
      make_call(g, seed, interpolation, padding, align_corners, jitter_std, jitter_prob, jitter_mode);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sample_grid_cuda",
                                  [&] { forward_typed<scalar_t>(input, grid, out, call); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_grid_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input_,
                                                             const at::Tensor& grid_, int64_t interpolation,
                                                             int64_t padding, bool align_corners, double jitter_std,
                                                             double jitter_prob, int64_t jitter_mode,
                                                             const c10::optional<at::Tensor>& jitter_seed,
                                                             bool input_requires_grad, bool grid_requires_grad) {
  at::Tensor seed;
  const GridGeometry g = check_sample_grid(input_, grid_, interpolation, padding, jitter_std, jitter_prob, jitter_mode,
                                           jitter_seed, &seed, &grad_output);
  DeviceGuard guard(input_.device());
  // Nearest sampling is piecewise constant: its grid gradient is 0.
  const bool need_grid = grid_requires_grad && interpolation != kNearest;
  BackwardBuffers buf;
  if (g.N * g.C * g.P > 0 && (input_requires_grad || need_grid)) {
    const at::Tensor input = input_.contiguous(), grid = grid_.contiguous(), gout = grad_output.contiguous();
    const SampleCall call =
        make_call(g, seed, interpolation, padding, align_corners, jitter_std, jitter_prob, jitter_mode);
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sample_grid_backward_cuda", [&] {
      backward_typed<scalar_t>(gout, input, grid, buf, call, input_requires_grad, need_grid, deterministic);
    });
  }
  // A gradient that is not asked for is an empty tensor; one with nothing to add is zeros.
  if (!buf.grad_input.defined()) {
    buf.grad_input =
        input_requires_grad ? at::zeros(input_.sizes(), input_.options()) : at::empty({0}, input_.options());
  }
  if (!buf.grad_grid.defined()) {
    buf.grad_grid = grid_requires_grad ? at::zeros(grid_.sizes(), grid_.options()) : at::empty({0}, grid_.options());
  }
  return {buf.grad_input, buf.grad_grid};
}

std::tuple<at::Tensor, at::Tensor> jitter_noise_cuda(const at::Tensor& seed_, int64_t num_points, int64_t dim,
                                                     double std, double prob, int64_t mode) {
  check_jitter_noise(seed_, num_points, dim, std, prob, mode);
  DeviceGuard guard(seed_.device());
  const at::Tensor seed = seed_.contiguous();
  at::Tensor noise = at::empty({num_points, dim}, seed.options().dtype(at::kFloat));
  at::Tensor flags = at::empty({num_points}, seed.options().dtype(at::kBool));
  if (num_points == 0) return {noise, flags};
  TORCH_CHECK(ceil_div(num_points, kNoiseThreads) <= INT_MAX, "jitter_noise: too many points (", num_points, ")");
  launch<jitter_noise_kernel>(dim3(static_cast<unsigned>(ceil_div(num_points, kNoiseThreads))), dim3(kNoiseThreads), 0,
                              current_stream(), seed.data_ptr<int64_t>(), num_points, static_cast<int>(dim),
                              static_cast<float>(std), static_cast<float>(prob), static_cast<int>(mode),
                              noise.data_ptr<float>(), flags.data_ptr<bool>());
  return {noise, flags};
}

}  // namespace

TORCH_LIBRARY_IMPL(GRAD_EXT_CUDA_OPS, GRAD_EXT_CUDA_KEY, m) {
  m.impl("sample_grid", &sample_grid_cuda);
  m.impl("sample_grid_backward", &sample_grid_backward_cuda);
  m.impl("jitter_noise", &jitter_noise_cuda);
}

}  // namespace grad_ext
