// CPU kernels of sample_grid: the work is split into (point tile, channel tile) tasks so that
// both GRAD shapes fill the cores: few points with many channels (the global grid) and many
// points on a small shared table (the local grid). The backward pass gives every task whole
// channel rows of the input gradient, so it needs no atomics and is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "grid_common.h"
#include "philox.h"
#include "sample_grid.h"

namespace grad_ext {
namespace {

constexpr int64_t kPointTile = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Corner setup of one point, with the jitter added to its coordinates.
template <typename scalar_t, int D>
void point_corners(const scalar_t* grid, int64_t point, const GridGeometry& g, int interpolation,
                   int padding, bool align_corners, const NonFinitePolicy& policy,
                   const JitterParams& jitter, bool with_grad,
                   PointCorners<at::opmath_type<scalar_t>, D>& pc) {
  using acc_t = at::opmath_type<scalar_t>;
  float noise[4];
  jitter_point(jitter, point, noise);
  acc_t coords[D];
  for (int k = 0; k < D; ++k) coords[k] = static_cast<acc_t>(grid[point * D + k]) + static_cast<acc_t>(noise[k]);
  setup_corners<acc_t, D>(coords, g.sizes, g.strides, interpolation, padding, align_corners, policy,
                          with_grad, pc);
}

JitterParams cpu_jitter(double std, double prob, int64_t mode, const c10::optional<at::Tensor>& seed) {
  if (!jitter_requested(std, prob)) return JitterParams{};
  const int64_t* s = seed->contiguous().data_ptr<int64_t>();
  return make_jitter(static_cast<float>(std), static_cast<float>(prob), static_cast<int>(mode), s[0], s[1]);
}

template <typename scalar_t, int D>
void forward_kernel(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const GridGeometry& g,
                    int interpolation, int padding, bool align_corners, const JitterParams& jitter) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const NonFinitePolicy policy = cpu_policy(D);
  const int K = interpolation == kNearest ? 1 : (1 << D);

  const int64_t tiles_per_batch = ceil_div(g.P, kPointTile);
  const int64_t point_tiles = g.N * tiles_per_batch;
  const int64_t threads = at::get_num_threads();
  const int64_t channel_tile = ceil_div(g.C, std::clamp<int64_t>(ceil_div(4 * threads, point_tiles), 1, g.C));
  const int64_t channel_tiles = ceil_div(g.C, channel_tile);

  at::parallel_for(0, point_tiles * channel_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<PointCorners<acc_t, D>> pcs(kPointTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pt = task / channel_tiles, ct = task % channel_tiles;
      const int64_t n = pt / tiles_per_batch;
      const int64_t p0 = (pt % tiles_per_batch) * kPointTile, p1 = std::min(g.P, p0 + kPointTile);
      for (int64_t p = p0; p < p1; ++p) {
        point_corners<scalar_t, D>(gr, n * g.P + p, g, interpolation, padding, align_corners, policy, jitter,
                                   false, pcs[p - p0]);
      }
      const scalar_t* table = in + (g.N_in == 1 ? 0 : n) * g.C * g.S;
      const int64_t c0 = ct * channel_tile, c1 = std::min(g.C, c0 + channel_tile);
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* row = table + c * g.S;
        scalar_t* orow = o + (n * g.C + c) * g.P;
        for (int64_t p = p0; p < p1; ++p) {
          const PointCorners<acc_t, D>& pc = pcs[p - p0];
          acc_t acc = pc.bias;
          for (int k = 0; k < K; ++k) {
            if (pc.valid >> k & 1u) acc += pc.weight[k] * static_cast<acc_t>(row[pc.offset[k]]);
          }
          orow[p] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

template <typename scalar_t, int D>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& grid,
                     at::Tensor& grad_input, at::Tensor& grad_grid, const GridGeometry& g, int interpolation,
                     int padding, bool align_corners, const JitterParams& jitter) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KMax = 1 << D;
  const bool bilinear = interpolation == kBilinear;
  const int K = bilinear ? KMax : 1;
  const bool need_input = grad_input.numel() > 0;
  const bool need_grid = grad_grid.numel() > 0 && bilinear;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* gi = need_input ? grad_input.data_ptr<scalar_t>() : nullptr;
  const NonFinitePolicy policy = cpu_policy(D);

  // Tasks own (table batch, channel tile); the grid gradient is summed per channel tile
  // into its own slice of `partial` and reduced in a fixed order afterwards.
  const int64_t threads = at::get_num_threads();
  const int64_t channel_tile = ceil_div(g.C, std::clamp<int64_t>(ceil_div(2 * threads, g.N_in), 1, g.C));
  const int64_t channel_tiles = ceil_div(g.C, channel_tile);
  const int64_t total_points = g.N * g.P;
  at::Tensor partial;
  acc_t* part = nullptr;
  if (need_grid) {
    partial = at::zeros({channel_tiles, total_points, D}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    part = partial.data_ptr<acc_t>();
  }

  at::parallel_for(0, g.N_in * channel_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<PointCorners<acc_t, D>> pcs(kPointTile);
    std::vector<acc_t> dw(kPointTile * KMax * D);
    std::vector<acc_t> gacc(kPointTile * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channel_tiles, ct = task % channel_tiles;
      const int64_t c0 = ct * channel_tile, c1 = std::min(g.C, c0 + channel_tile);
      const int64_t n_begin = g.N_in == 1 ? 0 : b, n_end = g.N_in == 1 ? g.N : b + 1;
      const scalar_t* table = in + b * g.C * g.S;
      scalar_t* gtable = need_input ? gi + b * g.C * g.S : nullptr;
      for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t p0 = 0; p0 < g.P; p0 += kPointTile) {
          const int64_t p1 = std::min(g.P, p0 + kPointTile);
          for (int64_t p = p0; p < p1; ++p) {
            PointCorners<acc_t, D>& pc = pcs[p - p0];
            point_corners<scalar_t, D>(gr, n * g.P + p, g, interpolation, padding, align_corners, policy, jitter,
                                       need_grid, pc);
            if (need_grid) {
              for (int k = 0; k < KMax; ++k)
                for (int a = 0; a < D; ++a) dw[((p - p0) * KMax + k) * D + a] = corner_weight_grad(pc, k, a);
            }
          }
          std::fill(gacc.begin(), gacc.end(), acc_t(0));
          for (int64_t c = c0; c < c1; ++c) {
            const scalar_t* row = table + c * g.S;
            scalar_t* grow = need_input ? gtable + c * g.S : nullptr;
            const scalar_t* gorow = go + (n * g.C + c) * g.P;
            for (int64_t p = p0; p < p1; ++p) {
              const PointCorners<acc_t, D>& pc = pcs[p - p0];
              const acc_t gval = static_cast<acc_t>(gorow[p]);
              for (int k = 0; k < K; ++k) {
                if (!(pc.valid >> k & 1u)) continue;
                if (need_input) grow[pc.offset[k]] += static_cast<scalar_t>(pc.weight[k] * gval);
                if (need_grid) {
                  const acc_t v = gval * static_cast<acc_t>(row[pc.offset[k]]);
                  const acc_t* d = &dw[((p - p0) * KMax + k) * D];
                  for (int a = 0; a < D; ++a) gacc[(p - p0) * D + a] += d[a] * v;
                }
              }
            }
          }
          if (need_grid) {
            acc_t* dst = part + (ct * total_points + n * g.P + p0) * D;
            for (int64_t i = 0; i < (p1 - p0) * D; ++i) dst[i] += gacc[i];
          }
        }
      }
    }
  });

  // Nearest: the output is piecewise constant in the coordinates, its gradient stays 0.
  if (!need_grid) return;
  scalar_t* gg = grad_grid.data_ptr<scalar_t>();
  at::parallel_for(0, total_points, 256, [&](int64_t begin, int64_t end) {
    PointCorners<acc_t, D> pc;
    for (int64_t i = begin; i < end; ++i) {
      point_corners<scalar_t, D>(gr, i, g, interpolation, padding, align_corners, policy, jitter, true, pc);
      for (int a = 0; a < D; ++a) {
        acc_t s = pc.grad_bias[a];
        for (int64_t ct = 0; ct < channel_tiles; ++ct) s += part[(ct * total_points + i) * D + a];
        gg[i * D + (D - 1 - a)] = static_cast<scalar_t>(s * pc.mult[a]);
      }
    }
  });
}

template <typename F>
void dispatch_dim(int D, F&& f) {
  switch (D) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "sample_grid: table dimension must be 1 to 4, got ", D);
  }
}

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "sample_grid: on the CPU input must be float32 or float64, got ", input.scalar_type());
}

at::Tensor sample_grid_cpu(const at::Tensor& input_, const at::Tensor& grid_, int64_t interpolation,
                           int64_t padding, bool align_corners, double jitter_std, double jitter_prob,
                           int64_t jitter_mode, const c10::optional<at::Tensor>& jitter_seed) {
  const GridGeometry g = describe_call(input_, grid_);
  check_cpu_dtype(input_);
  check_jitter(jitter_std, jitter_prob, jitter_mode, jitter_seed, input_);
  at::Tensor out = at::empty(g.out_shape, input_.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous();
  const JitterParams jitter = cpu_jitter(jitter_std, jitter_prob, jitter_mode, jitter_seed);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sample_grid_cpu", [&] {
    dispatch_dim(g.D, [&](auto dim) {
      forward_kernel<scalar_t, decltype(dim)::value>(input, grid, out, g, static_cast<int>(interpolation),
                                                     static_cast<int>(padding), align_corners, jitter);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_grid_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input_, const at::Tensor& grid_, int64_t interpolation,
    int64_t padding, bool align_corners, double jitter_std, double jitter_prob, int64_t jitter_mode,
    const c10::optional<at::Tensor>& jitter_seed, bool input_requires_grad, bool grid_requires_grad) {
  const GridGeometry g = describe_call(input_, grid_);
  check_cpu_dtype(input_);
  // A gradient that is not asked for comes back as an empty tensor.
  at::Tensor grad_input = input_requires_grad ? at::zeros(input_.sizes(), input_.options()) : at::empty({0}, input_.options());
  at::Tensor grad_grid = grid_requires_grad ? at::zeros(grid_.sizes(), grid_.options()) : at::empty({0}, grid_.options());
  if (g.N * g.C * g.P == 0 || (!input_requires_grad && !grid_requires_grad)) return {grad_input, grad_grid};
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous(), gout = grad_output.contiguous();
  const JitterParams jitter = cpu_jitter(jitter_std, jitter_prob, jitter_mode, jitter_seed);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sample_grid_backward_cpu", [&] {
    dispatch_dim(g.D, [&](auto dim) {
      backward_kernel<scalar_t, decltype(dim)::value>(gout, input, grid, grad_input, grad_grid, g,
                                                      static_cast<int>(interpolation), static_cast<int>(padding),
                                                      align_corners, jitter);
    });
  });
  return {grad_input, grad_grid};
}

std::tuple<at::Tensor, at::Tensor> jitter_noise_cpu(const at::Tensor& seed, int64_t num_points, int64_t dim,
                                                    double std, double prob, int64_t mode) {
  TORCH_CHECK(num_points >= 0, "jitter_noise: num_points must be >= 0, got ", num_points);
  TORCH_CHECK(dim >= 1 && dim <= kMaxDim, "jitter_noise: dim must be 1 to 4, got ", dim);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2,
              "jitter_noise: jitter_seed must be an int64 tensor of 2 elements [seed, offset]");
  at::Tensor noise = at::zeros({num_points, dim}, seed.options().dtype(at::kFloat));
  at::Tensor flags = at::zeros({num_points}, seed.options().dtype(at::kBool));
  const int64_t* s = seed.contiguous().data_ptr<int64_t>();
  const JitterParams j = make_jitter(static_cast<float>(std), static_cast<float>(prob), static_cast<int>(mode), s[0], s[1]);
  float* nz = noise.data_ptr<float>();
  bool* fl = flags.data_ptr<bool>();
  at::parallel_for(0, num_points, 1024, [&](int64_t begin, int64_t end) {
    float v[4];
    for (int64_t i = begin; i < end; ++i) {
      fl[i] = jitter_point(j, i, v);
      for (int64_t k = 0; k < dim; ++k) nz[i * dim + k] = v[k];
    }
  });
  return {noise, flags};
}

}  // namespace

TORCH_LIBRARY_IMPL(grad_ext, CPU, m) {
  m.impl("sample_grid", &sample_grid_cpu);
  m.impl("sample_grid_backward", &sample_grid_backward_cpu);
  m.impl("jitter_noise", &jitter_noise_cpu);
}

}  // namespace grad_ext
