// CPU sample_grid: the launchers that split the work into (point tile, channel tile) tasks so
// that both GRAD shapes fill the cores, few points with many channels (the global grid) and
// many points on a small shared table (the local grid), and choose per task between the loop
// kinds of sample_grid_rows.h, sample_grid_cells.h and sample_grid_dense.h. The backward pass
// gives every task whole channel rows of the input gradient, so it needs no atomics and is
// deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/sample_grid_cells.h"
#include "cpu/sample_grid_dense.h"
#include "cpu/sample_grid_rows.h"
#include "cpu/simd.h"
#include "grid_common.h"
#include "philox.h"
#include "sample_grid.h"

namespace grad_ext {
namespace {

using namespace grad_ext::cpu;

// Smallest task of the per-point passes (the grid gradient's final sums, jitter noise): a
// parallel region costs about as much as a few hundred points' work.
constexpr int64_t kPointsPerParallelTask = 256;
constexpr int64_t kNoisePointsPerParallelTask = 1024;

// Channels per task when tasks own (table batch, channel tile): enough tiles for two tasks a
// thread over the table batches.
int64_t table_channel_tile(const GridGeometry& g) {
  return ceil_div(g.C, std::clamp<int64_t>(ceil_div(2 * at::get_num_threads(), g.N_in), 1, g.C));
}

// Per-image tables read by many corners per cell: tasks own (image, channel tile) and copy
// their channels of the table into a private (cell, channel) block that stays in cache while
// all of the image's points read it (see use_local_cells).
template <typename scalar_t, int D, int TAPS>
void forward_local_cells(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const GridGeometry& g,
                         int interpolation, int padding, bool align_corners, const JitterParams& jitter,
                         int64_t channel_tile) {
  using acc_t = at::opmath_type<scalar_t>;
  using Tile = CornerTile<acc_t, TAPS, D>;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t tiles_per_batch = ceil_div(g.P, kPointTile);
  const int64_t channel_tiles = ceil_div(g.C, channel_tile);
  const bool stream = streams_output(o, g.P, out.nbytes());
  at::parallel_for(0, g.N * channel_tiles, 1, [&](int64_t begin, int64_t end) {
    auto tile = std::make_unique<Tile>();
    std::vector<acc_t> scratch(kPointTile * kScratchStride);
    std::vector<scalar_t> cellsT((g.S + 1) * channel_tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / channel_tiles, ct = task % channel_tiles;
      const int64_t c0 = ct * channel_tile, c1 = std::min(g.C, c0 + channel_tile);
      const scalar_t* table = in + n * g.C * g.S;
      channel_cells(table + c0 * g.S, c1 - c0, g.S, cellsT.data(), channel_tile);
      for (int64_t t = 0; t < tiles_per_batch; ++t) {
        const int64_t p0 = t * kPointTile;
        tile->fill(gr, n * g.P + p0, std::min(g.P, p0 + kPointTile) - p0, g, interpolation, padding, align_corners,
                   jitter, false);
        scalar_t* obase = o + n * g.C * g.P + p0;
        if (!tile->biased) {
          forward_cells<scalar_t, TAPS, D>({tile.get(), cellsT.data(), c0, channel_tile, g.S, c0, c1, g.P,
                                            scratch.data(), obase, nullptr, nullptr, 0, nullptr, stream});
          continue;
        }
        for (int64_t c = c0; c < c1; ++c)  // a non-finite bias (NaN coordinates): the checked row loop
          forward_rows<scalar_t, acc_t, TAPS, D, true>(*tile, table, obase, c, g.S, g.P);
      }
    }
  });
}

template <typename scalar_t, int D, int TAPS>
void forward_kernel(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const GridGeometry& g,
                    int interpolation, int padding, bool align_corners, const JitterParams& jitter) {
  using acc_t = at::opmath_type<scalar_t>;
  using Tile = CornerTile<acc_t, TAPS, D>;
  constexpr int K = Tile::K;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t tiles_per_batch = ceil_div(g.P, kPointTile);
  const int64_t threads = at::get_num_threads();
  if (g.N_in > 1) {
    const int64_t local_tile = round_up(table_channel_tile(g), kLanes);
    if (use_local_cells(g, K, local_tile, sizeof(scalar_t))) {
      forward_local_cells<scalar_t, D, TAPS>(input, grid, out, g, interpolation, padding, align_corners, jitter,
                                             local_tile);
      return;
    }
  }
  const auto tile_channels = [&](int64_t point_tasks) {
    return ceil_div(g.C, std::clamp<int64_t>(ceil_div(4 * threads, point_tasks), 1, g.C));
  };
  int64_t channel_tile = tile_channels(g.N * tiles_per_batch);
  const bool by_cells = use_cells(g, K, channel_tile, sizeof(scalar_t), kCellsForwardReadsPerCell, 0);
  // The row loops take a block of tiles per task and run it channel by channel, so that one
  // channel's row of the table stays in cache while all the block's points read it.
  const int64_t block = by_cells ? 1 : rows_block_tiles<acc_t, K>(tiles_per_batch);
  const int64_t blocks_per_batch = ceil_div(tiles_per_batch, block);
  const int64_t point_blocks = g.N * blocks_per_batch;
  if (by_cells) {
    channel_tile = round_up(channel_tile, kLanes);
  } else {
    channel_tile = tile_channels(point_blocks);
  }
  const int64_t channel_tiles = ceil_div(g.C, channel_tile);
  const at::Tensor cells = by_cells ? cell_major(input, g) : at::Tensor();
  const int64_t Cp = round_up(g.C, kLanes);
  const bool stream = by_cells && streams_output(o, g.P, out.nbytes());

  at::parallel_for(0, point_blocks * channel_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::unique_ptr<Tile>> tiles(block);
    for (auto& t : tiles) t = std::make_unique<Tile>();
    std::vector<acc_t> scratch(by_cells ? kPointTile * kScratchStride : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pb = task / channel_tiles, ct = task % channel_tiles;
      const int64_t n = pb / blocks_per_batch;
      const int64_t t0 = (pb % blocks_per_batch) * block, count = std::min(tiles_per_batch, t0 + block) - t0;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t p0 = (t0 + j) * kPointTile;
        tiles[j]->fill(gr, n * g.P + p0, std::min(g.P, p0 + kPointTile) - p0, g, interpolation, padding, align_corners,
                       jitter, false);
      }
      const int64_t b = g.N_in == 1 ? 0 : n;
      const scalar_t* table = in + b * g.C * g.S;
      scalar_t* obase = o + n * g.C * g.P + t0 * kPointTile;
      const int64_t c0 = ct * channel_tile, c1 = std::min(g.C, c0 + channel_tile);
      // Tiles with a non-finite bias (NaN coordinates) take the checked row loop.
      if (by_cells && !tiles[0]->biased) {
        forward_cells<scalar_t, TAPS, D>({tiles[0].get(), cells.data_ptr<scalar_t>() + b * (g.S + 1) * Cp, 0, Cp, g.S,
                                          c0, c1, g.P, scratch.data(), obase, nullptr, nullptr, 0, nullptr, stream});
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t j = 0; j < count; ++j) {
          const Tile& tile = *tiles[j];
          scalar_t* tile_out = obase + j * kPointTile;
          if (tile.checked) {
            forward_rows<scalar_t, acc_t, TAPS, D, true>(tile, table, tile_out, c, g.S, g.P);
          } else {
            forward_rows<scalar_t, acc_t, TAPS, D, false>(tile, table, tile_out, c, g.S, g.P);
          }
        }
      }
    }
  });
}

template <typename scalar_t, int D, int TAPS, bool NEED_INPUT, bool NEED_GRID>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& grid,
                     at::Tensor& grad_input, at::Tensor& grad_grid, const GridGeometry& g, int interpolation,
                     int padding, bool align_corners, const JitterParams& jitter) {
  using acc_t = at::opmath_type<scalar_t>;
  using Tile = CornerTile<acc_t, TAPS, D>;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* gi = NEED_INPUT ? grad_input.data_ptr<scalar_t>() : nullptr;

  // Tasks own (table batch, channel tile), so each writes its rows of the input gradient once
  // (grad_input comes uninitialised); the grid gradient is summed per channel tile into its
  // own slice of `partial` and reduced in a fixed order afterwards.
  int64_t channel_tile = table_channel_tile(g);
  constexpr int K = Tile::K;
  const bool by_cells =
      use_cells(g, K, channel_tile, sizeof(scalar_t), kCellsBackwardReadsPerCell, sizeof(acc_t) + sizeof(scalar_t));
  if (by_cells) channel_tile = round_up(channel_tile, kLanes);
  const int64_t channel_tiles = ceil_div(g.C, channel_tile);
  const int64_t total_points = g.N * g.P;
  at::Tensor partial;
  acc_t* part = nullptr;
  if (NEED_GRID) {
    partial =
        at::zeros({channel_tiles, D, total_points}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    part = partial.data_ptr<acc_t>();
  }

  // The row loops run a block of tiles channel by channel (see forward_kernel).
  const int64_t tiles_per_batch = ceil_div(g.P, kPointTile);
  const int64_t block = by_cells ? 1 : rows_block_tiles<acc_t, K>(tiles_per_batch);
  at::parallel_for(0, g.N_in * channel_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::unique_ptr<Tile>> tiles(block);
    for (auto& t : tiles) t = std::make_unique<Tile>();
    std::vector<acc_t> gacc(NEED_GRID ? block * kPointTile * D : 0);
    std::vector<acc_t> scratch(by_cells ? kPointTile * kScratchStride : 0);
    // The cell-major loops read a (cell, channel) copy of the task's channels and sum the
    // input gradient in a private block of that layout: both stay in cache, which a copy of
    // the whole table (as the forward pass makes) would not.
    const int64_t Wt = by_cells ? channel_tile : 0;  // a multiple of kLanes
    std::vector<scalar_t> cellsT(by_cells ? (g.S + 1) * Wt : 0);
    std::vector<acc_t> gradT(NEED_INPUT && by_cells ? (g.S + 1) * Wt : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channel_tiles, ct = task % channel_tiles;
      const int64_t c0 = ct * channel_tile, c1 = std::min(g.C, c0 + channel_tile);
      const int64_t n_begin = g.N_in == 1 ? 0 : b, n_end = g.N_in == 1 ? g.N : b + 1;
      const scalar_t* table = in + b * g.C * g.S;
      scalar_t* gtable = NEED_INPUT ? gi + b * g.C * g.S : nullptr;
      // whether the task's rows of grad_input hold sums (cleared, then added to by row loops)
      bool rows_written = false;
      const auto clear_rows = [&] {
        if (NEED_INPUT && !rows_written) std::fill(gtable + c0 * g.S, gtable + c1 * g.S, scalar_t(0));
        rows_written = true;
      };
      if (by_cells) {
        channel_cells(table + c0 * g.S, c1 - c0, g.S, cellsT.data(), Wt);
        std::fill(gradT.begin(), gradT.end(), acc_t(0));
      } else {
        clear_rows();
      }
      for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t t0 = 0; t0 < tiles_per_batch; t0 += block) {
          const int64_t count = std::min(tiles_per_batch, t0 + block) - t0;
          const int64_t p_begin = t0 * kPointTile;
          for (int64_t j = 0; j < count; ++j) {
            const int64_t p0 = (t0 + j) * kPointTile;
            tiles[j]->fill(gr, n * g.P + p0, std::min(g.P, p0 + kPointTile) - p0, g, interpolation, padding,
                           align_corners, jitter, NEED_GRID);
          }
          std::fill(gacc.begin(), gacc.end(), acc_t(0));
          const scalar_t* gout = go + n * g.C * g.P + p_begin;
          if (by_cells && !tiles[0]->biased) {
            backward_cells<scalar_t, TAPS, D, NEED_INPUT, NEED_GRID>({tiles[0].get(), cellsT.data(), c0, Wt, g.S, c0,
                                                                      c1, g.P, scratch.data(), nullptr, gout,
                                                                      gradT.data(), Wt, gacc.data()});
          } else {
            if (by_cells) clear_rows();  // a tile with a non-finite bias adds to the rows directly
            for (int64_t c = c0; c < c1; ++c) {
              for (int64_t j = 0; j < count; ++j) {
                const Tile& tile = *tiles[j];
                acc_t* tile_gacc = NEED_GRID ? gacc.data() + j * kPointTile * D : nullptr;
                const scalar_t* tile_gout = gout + j * kPointTile;
                if (tile.checked) {
                  backward_rows<scalar_t, acc_t, TAPS, D, NEED_INPUT, NEED_GRID, true>(tile, table, gtable, tile_gout,
                                                                                       tile_gacc, c, g.S, g.P);
                } else {
                  backward_rows<scalar_t, acc_t, TAPS, D, NEED_INPUT, NEED_GRID, false>(tile, table, gtable, tile_gout,
                                                                                        tile_gacc, c, g.S, g.P);
                }
              }
            }
          }
          if (NEED_GRID) {
            for (int64_t j = 0; j < count; ++j) {
              const int64_t p0 = (t0 + j) * kPointTile, m = std::min(g.P, p0 + kPointTile) - p0;
              for (int a = 0; a < D; ++a) {
                acc_t* dst = part + (ct * D + a) * total_points + n * g.P + p0;
                const acc_t* src = gacc.data() + j * kPointTile * D + a * kPointTile;
                for (int64_t i = 0; i < m; ++i) dst[i] += src[i];
              }
            }
          }
        }
      }
      if (NEED_INPUT && by_cells) {  // the private block into the task's rows
        if (rows_written) {
          from_cells<true>(gradT.data(), Wt, c1 - c0, g.S, gtable + c0 * g.S, g.S);
        } else {
          from_cells<false>(gradT.data(), Wt, c1 - c0, g.S, gtable + c0 * g.S, g.S);
        }
      }
    }
  });

  if (!NEED_GRID) return;  // nearest: the output is piecewise constant, its grid gradient stays 0
  scalar_t* gg = grad_grid.data_ptr<scalar_t>();
  const NonFinitePolicy policy = cpu_policy(D);
  at::parallel_for(0, total_points, kPointsPerParallelTask, [&](int64_t begin, int64_t end) {
    PointCorners<acc_t, D, TAPS> pc;
    for (int64_t i = begin; i < end; ++i) {
      point_corners<scalar_t, D, TAPS>(gr, i, g, interpolation, padding, align_corners, policy, jitter, true, pc);
      for (int a = 0; a < D; ++a) {
        acc_t s = pc.grad_bias[a];
        for (int64_t ct = 0; ct < channel_tiles; ++ct) s += part[(ct * D + a) * total_points + i];
        gg[i * D + (D - 1 - a)] = static_cast<scalar_t>(s * pc.mult[a]);
      }
    }
  });
}

// Calls f(std::integral_constant<int, TAPS>{}) with the taps per axis of the interpolation:
// 1 nearest, 2 bilinear, 4 bicubic (1-D to 3-D tables; the checks reject 4-D bicubic).
template <int D, typename F>
void dispatch_taps(int64_t interpolation, F&& f) {
  if (interpolation == kNearest) {
    f(std::integral_constant<int, 1>{});
  } else if (interpolation == kBilinear) {
    f(std::integral_constant<int, 2>{});
  } else {
    if constexpr (D <= kMaxCubicDim) f(std::integral_constant<int, 4>{});
  }
}

// The CPU loops address a channel's cells with 32-bit offsets (8 to a vector gather).
void check_cpu_cells(const GridGeometry& g) {
  TORCH_CHECK_VALUE(g.S <= std::numeric_limits<int32_t>::max(), "sample_grid: on the CPU one channel of input may ",
                    "hold at most 2^31 - 1 cells, got ", g.S);
}

// float16 and bfloat16 run on float32 copies of their inputs, so every product and sum is in
// float32 (as F.grid_sample computes them on the CPU) and each result is rounded once.
bool reduced_precision(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

at::Tensor sample_grid_cpu(const at::Tensor& input_, const at::Tensor& grid_, int64_t interpolation, int64_t padding,
                           bool align_corners, double jitter_std, double jitter_prob, int64_t jitter_mode,
                           const c10::optional<at::Tensor>& jitter_seed) {
  at::Tensor seed;
  const GridGeometry g = check_sample_grid(input_, grid_, interpolation, padding, jitter_std, jitter_prob, jitter_mode,
                                           jitter_seed, &seed);
  check_cpu_cells(g);
  if (reduced_precision(input_)) {
    return sample_grid_cpu(input_.to(at::kFloat), grid_.to(at::kFloat), interpolation, padding, align_corners,
                           jitter_std, jitter_prob, jitter_mode, jitter_seed)
        .to(input_.scalar_type());
  }
  at::Tensor out = at::empty(g.out_shape, input_.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous();
  const JitterParams jitter = host_jitter(jitter_std, jitter_prob, jitter_mode, seed);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sample_grid_cpu", [&] {
    dispatch_dim(g.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (dense_eligible(g, static_cast<int>(interpolation)) &&
          dense_forward<scalar_t, D>(input, grid, out, g, static_cast<int>(padding), align_corners, jitter))
        return;
      dispatch_taps<D>(interpolation, [&](auto taps) {
        forward_kernel<scalar_t, D, decltype(taps)::value>(input, grid, out, g, static_cast<int>(interpolation),
                                                           static_cast<int>(padding), align_corners, jitter);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_grid_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input_,
                                                            const at::Tensor& grid_, int64_t interpolation,
                                                            int64_t padding, bool align_corners, double jitter_std,
                                                            double jitter_prob, int64_t jitter_mode,
                                                            const c10::optional<at::Tensor>& jitter_seed,
                                                            bool input_requires_grad, bool grid_requires_grad) {
  at::Tensor seed;
  const GridGeometry g = check_sample_grid(input_, grid_, interpolation, padding, jitter_std, jitter_prob, jitter_mode,
                                           jitter_seed, &seed, &grad_output);
  check_cpu_cells(g);
  if (reduced_precision(input_)) {
    auto grads = sample_grid_backward_cpu(grad_output.to(at::kFloat), input_.to(at::kFloat), grid_.to(at::kFloat),
                                          interpolation, padding, align_corners, jitter_std, jitter_prob, jitter_mode,
                                          jitter_seed, input_requires_grad, grid_requires_grad);
    return {std::get<0>(grads).to(input_.scalar_type()), std::get<1>(grads).to(input_.scalar_type())};
  }
  // A gradient that is not asked for comes back as an empty tensor.
  // Uninitialised: every path below writes all of it (the dense path by a matrix product,
  // backward_kernel task by task).
  at::Tensor grad_input =
      input_requires_grad ? at::empty(input_.sizes(), input_.options()) : at::empty({0}, input_.options());
  at::Tensor grad_grid =
      grid_requires_grad ? at::zeros(grid_.sizes(), grid_.options()) : at::empty({0}, grid_.options());
  if (g.N * g.C * g.P == 0 || (!input_requires_grad && !grid_requires_grad)) {
    if (input_requires_grad) grad_input.zero_();  // no point reads the table
    return {grad_input, grad_grid};
  }
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous(), gout = grad_output.contiguous();
  const JitterParams jitter = host_jitter(jitter_std, jitter_prob, jitter_mode, seed);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sample_grid_backward_cpu", [&] {
    dispatch_dim(g.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (dense_eligible(g, static_cast<int>(interpolation)) &&
          dense_backward<scalar_t, D>(gout, input, grid, grad_input, grad_grid, g, static_cast<int>(padding),
                                      align_corners, jitter, input_requires_grad, grid_requires_grad))
        return;
      dispatch_taps<D>(interpolation, [&](auto taps) {
        constexpr int TAPS = decltype(taps)::value;
        auto run = [&](auto need_input, auto need_grid) {
          backward_kernel<scalar_t, D, TAPS, decltype(need_input)::value, decltype(need_grid)::value>(
              gout, input, grid, grad_input, grad_grid, g, static_cast<int>(interpolation), static_cast<int>(padding),
              align_corners, jitter);
        };
        using T = std::true_type;
        using F = std::false_type;
        if constexpr (TAPS == 1) {  // nearest is piecewise constant: its grid gradient stays 0
          if (input_requires_grad) run(T{}, F{});
        } else if (input_requires_grad && grid_requires_grad) {
          run(T{}, T{});
        } else if (input_requires_grad) {
          run(T{}, F{});
        } else {
          run(F{}, T{});
        }
      });
    });
  });
  return {grad_input, grad_grid};
}

std::tuple<at::Tensor, at::Tensor> jitter_noise_cpu(const at::Tensor& seed_, int64_t num_points, int64_t dim,
                                                    double std, double prob, int64_t mode) {
  check_jitter_noise(seed_, num_points, dim, std, prob, mode);
  const at::Tensor seed = seed_.contiguous();
  at::Tensor noise = at::empty({num_points, dim}, seed.options().dtype(at::kFloat));
  at::Tensor flags = at::empty({num_points}, seed.options().dtype(at::kBool));
  const int64_t* s = seed.data_ptr<int64_t>();
  const JitterParams j =
      make_jitter(static_cast<float>(std), static_cast<float>(prob), static_cast<int>(mode), s[0], s[1]);
  float* nz = noise.data_ptr<float>();
  bool* fl = flags.data_ptr<bool>();
  at::parallel_for(0, num_points, kNoisePointsPerParallelTask, [&](int64_t begin, int64_t end) {
    float v[4];
    for (int64_t i = begin; i < end; ++i) {
      fl[i] = jitter_point(j, i, v);
      for (int64_t k = 0; k < dim; ++k) nz[i * dim + k] = v[k];
    }
  });
  return {noise, flags};
}

}  // namespace

std::string cpu_simd() { return cpu_has_avx2() ? "avx2" : "baseline"; }

TORCH_LIBRARY_IMPL(grad_ext, CPU, m) {
  m.impl("sample_grid", &sample_grid_cpu);
  m.impl("sample_grid_backward", &sample_grid_backward_cpu);
  m.impl("jitter_noise", &jitter_noise_cpu);
}

}  // namespace grad_ext
