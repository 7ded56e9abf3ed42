// Definitions of the launchers declared in sample_grid_launch.h: which kernel of
// sample_grid_kernels.cuh runs, with what launch shape, and the buffers between them.
// Included by one sample_grid_<dtype>.cu per dtype, which instantiates them.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "cuda/runtime.h"
#include "cuda/sample_grid_kernels.cuh"
#include "cuda/sample_grid_launch.h"
#include "sample_grid.h"

namespace grad_ext {
namespace cuda {
namespace {

// Launch heuristics.
// Below this many points per batch, lanes over points would idle: the channels kernel runs.
constexpr int64_t kFewPointsPerBatch = kPointLanes;
// Forward channels kernel: its staged table slice stays within the default 48 KB.
constexpr int64_t kForwardStageBytes = 48 * 1024;
// Table kernel: read the output-gradient tile along points when a batch holds at least this
// many consecutive points (32 lanes then read >= 4 runs of 4+ floats), else along channels.
constexpr int64_t kTileAlongPointsMinP = 4;
// Deterministic partial sums of the input gradient (table kernel): at most this much scratch.
constexpr int64_t kPartialBudgetBytes = int64_t(256) << 20;
constexpr unsigned kMaxGridY = 65535;

KernelGeometry kernel_geometry(const GridGeometry& g) {
  KernelGeometry k{g.N, g.N_in, g.C, g.P, g.S, {1, 1, 1, 1}, {0, 0, 0, 0}};
  for (int a = 0; a < kMaxDim; ++a) {
    k.sizes[a] = g.sizes[a];
    k.strides[a] = g.strides[a];
  }
  return k;
}

SampleParams sample_params(int64_t interpolation, int64_t padding, bool align_corners, double std, double prob,
                           int64_t mode, const at::Tensor& seed) {
  return SampleParams{static_cast<int>(interpolation),
                      static_cast<int>(padding),
                      align_corners,
                      static_cast<float>(std),
                      static_cast<float>(prob),
                      static_cast<int>(mode),
                      seed.defined() ? seed.data_ptr<int64_t>() : nullptr};
}

int64_t sm_count() { return device_limits().sm_count; }

// Channels per block of the channel-lane kernels: the widest multiple of 32 (up to 256)
// whose shared memory fits `budget`, balanced over the slices it takes; 0 if none fits.
template <typename SmemBytes>
int64_t slice_channels(int64_t C, int64_t budget, SmemBytes smem_bytes) {
  int64_t widest = 0;
  for (int64_t w = kWarp; w <= kMaxSliceChannels; w += kWarp)
    if (smem_bytes(w) <= budget) widest = w;
  if (widest == 0) return 0;
  const int64_t slices = ceil_div(C, widest);
  return std::min(widest, round_up(ceil_div(C, slices), kWarp));
}

// Point groups that split `points` so that about `target` blocks run, given `others` blocks
// per group; each group covers whole tiles of kTilePoints.
int64_t points_per_group(int64_t points, int64_t others, int64_t target) {
  const int64_t tiles = ceil_div(points, kTilePoints);
  const int64_t groups = std::clamp<int64_t>(ceil_div(target, std::max<int64_t>(others, 1)), 1, tiles);
  return ceil_div(tiles, groups) * kTilePoints;
}

template <typename scalar_t, int D, int TAPS>
void launch_forward(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const GridGeometry& g,
                    const KernelGeometry& kg, const SampleParams& sp, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (g.P < kFewPointsPerBatch) {
    const auto smem_bytes = [&](int64_t w) { return ChannelsShared<acc_t, D, TAPS>(g.S, w).bytes; };
    const int64_t slice = slice_channels(g.C, kForwardStageBytes, smem_bytes);
    if (slice > 0 && g.N_in <= kMaxGridY) {
      const int64_t slices = ceil_div(g.C, slice), smem = smem_bytes(slice);
      constexpr auto kernel = forward_channels_kernel<scalar_t, D, TAPS>;
      const int64_t target = resident_blocks<kernel>(static_cast<int>(slice), smem) * sm_count();
      const int64_t npoints = g.N_in == 1 ? g.N * g.P : g.P;
      const int64_t per_group = points_per_group(npoints, slices * g.N_in, target);
      const int64_t groups = ceil_div(npoints, per_group);
      TORCH_CHECK(slices <= INT_MAX && groups <= kMaxGridY, "sample_grid: too many channels or points for one launch");
      const dim3 blocks(static_cast<unsigned>(slices), static_cast<unsigned>(groups), static_cast<unsigned>(g.N_in));
      launch<kernel>(blocks, dim3(static_cast<unsigned>(slice)), smem, stream, input.data_ptr<scalar_t>(),
                     grid.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), kg, sp, per_group);
      return;
    }
  }
  constexpr auto kernel = forward_points_kernel<scalar_t, D, TAPS>;
  const int64_t point_blocks = g.N * ceil_div(g.P, kPointLanes);
  const int64_t target = resident_blocks<kernel>(kThreads, 0) * sm_count();
  const int64_t splits = std::clamp<int64_t>(ceil_div(target, point_blocks), 1,
                                             std::min<int64_t>(ceil_div(g.C, kChannelLanes), kMaxGridY));
  TORCH_CHECK(point_blocks <= INT_MAX, "sample_grid: too many points for one launch (", g.N * g.P, ")");
  const dim3 blocks(static_cast<unsigned>(point_blocks), static_cast<unsigned>(splits));
  launch<kernel>(blocks, dim3(kPointLanes, kChannelLanes), 0, stream, input.data_ptr<scalar_t>(),
                 grid.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), kg, sp);
}

template <typename scalar_t>
void launch_reduce_partials(const at::Tensor& partial, at::Tensor& out, Stream stream) {
  const int64_t numel = out.numel(), parts = partial.size(0);
  launch<reduce_partials_kernel<scalar_t>>(
      dim3(static_cast<unsigned>(ceil_div(numel, kReduceThreads))), dim3(kReduceThreads), 0, stream,
      partial.data_ptr<at::opmath_type<scalar_t>>(), parts, numel, out.data_ptr<scalar_t>());
}

// Table kernel; false when the table's rows do not fit in shared memory (nothing launched).
template <typename scalar_t, int D, int TAPS, bool NEED_GRID>
bool launch_table_backward(const at::Tensor& gout, const at::Tensor& input, const at::Tensor& grid,
                           BackwardBuffers& buf, const GridGeometry& g, const KernelGeometry& kg,
                           const SampleParams& sp, bool deterministic, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (g.N_in > kMaxGridY) return false;
  const DeviceLimits& device = device_limits();
  constexpr auto kernel = table_backward_kernel<scalar_t, D, TAPS, NEED_GRID>;
  // Two blocks per SM if the slice can be that narrow (each block also costs the SM its reserved
  // and static shared memory), else one as large as a block may be.
  const auto smem_bytes = [&](int64_t w) { return TableShared<acc_t, D, TAPS>(g.S, w, NEED_GRID).bytes; };
  const int64_t static_smem = kernel_resources<kernel>().static_smem;
  const int64_t two_per_sm = device.smem_per_sm / 2 - device.reserved_smem_per_block - static_smem;
  int64_t slice = slice_channels(g.C, two_per_sm, smem_bytes);
  if (slice == 0) slice = slice_channels(g.C, device.smem_per_block_optin - static_smem, smem_bytes);
  if (slice == 0) return false;
  const int64_t slices = ceil_div(g.C, slice), smem = smem_bytes(slice);
  const int64_t target = resident_blocks<kernel>(static_cast<int>(slice), smem) * sm_count();
  const int64_t npoints = g.N_in == 1 ? g.N * g.P : g.P;
  const int64_t table_bytes = g.N_in * g.C * g.S * static_cast<int64_t>(sizeof(acc_t));
  int64_t per_group = points_per_group(npoints, slices * g.N_in, target);
  if (deterministic) {  // bound the partial sums' memory
    const int64_t max_groups = std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(table_bytes, 1));
    per_group = std::max(per_group, round_up(ceil_div(npoints, max_groups), kTilePoints));
  }
  const int64_t groups = ceil_div(npoints, per_group);
  TORCH_CHECK(groups * slices <= INT_MAX, "sample_grid_backward: too many channels or points for one launch");

  at::Tensor& grad_input = buf.grad_input;
  at::Tensor accum, partial;
  scalar_t* direct = nullptr;
  acc_t* accum_ptr = nullptr;
  acc_t* partial_ptr = nullptr;
  const auto acc_opts = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (groups == 1) {
    grad_input = at::empty(input.sizes(), input.options());  // every element written once
    direct = grad_input.data_ptr<scalar_t>();
  } else if (deterministic) {
    grad_input = at::empty(input.sizes(), input.options());
    partial = at::empty({groups, g.N_in, g.C, g.S}, acc_opts);
    partial_ptr = partial.data_ptr<acc_t>();
  } else {
    accum = at::zeros(input.sizes(), acc_opts);
    accum_ptr = accum.data_ptr<acc_t>();
  }
  if (NEED_GRID) {
    buf.grid_parts = slices;
    buf.grid_partial = at::empty({g.N * g.P, slices, D}, acc_opts);
  }
  const dim3 blocks(static_cast<unsigned>(groups * slices), 1, static_cast<unsigned>(g.N_in));
  launch<kernel>(blocks, dim3(static_cast<unsigned>(slice)), smem, stream, gout.data_ptr<scalar_t>(),
                 input.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(), direct, accum_ptr, partial_ptr,
                 NEED_GRID ? buf.grid_partial.data_ptr<acc_t>() : nullptr, kg, sp, slices, per_group,
                 g.P >= kTileAlongPointsMinP);
  if (partial.defined()) {
    launch_reduce_partials<scalar_t>(partial, grad_input, stream);
  } else if (accum.defined()) {
    grad_input = std::is_same<scalar_t, acc_t>::value ? accum : accum.to(input.scalar_type());
  }
  return true;
}

// Deterministic input gradient of a large table: the (point, tap) pairs sorted by cell, stably
// (torch's sort, on the device), then each cell's run summed in order (sorted_cells_kernel).
// Scratch: about 24 bytes per pair, where per-group copies of the table took up to 256 MB.
template <typename scalar_t, int D, int TAPS>
void launch_sorted_cells_backward(const at::Tensor& gout, const at::Tensor& input, const at::Tensor& grid,
                                  BackwardBuffers& buf, const GridGeometry& g, const KernelGeometry& kg,
                                  const SampleParams& sp, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = Pow<TAPS, D>::value;
  const int64_t points = g.N * g.P, items = points * K;
  TORCH_CHECK(ceil_div(items, kReduceThreads) <= INT_MAX, "sample_grid_backward: too many points for one launch (",
              points, ")");
  const auto acc_opts = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor keys = at::empty({items}, input.options().dtype(at::kLong));
  at::Tensor weights = at::empty({items}, acc_opts);
  launch<cell_keys_kernel<scalar_t, D, TAPS>>(dim3(static_cast<unsigned>(ceil_div(points, kReduceThreads))),
                                              dim3(kReduceThreads), 0, stream, grid.data_ptr<scalar_t>(),
                                              keys.data_ptr<int64_t>(), weights.data_ptr<acc_t>(), kg, sp);
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_keys = std::get<0>(sorted), order = std::get<1>(sorted);
  buf.grad_input = at::zeros(input.sizes(), input.options());  // cells without taps
  const dim3 blocks(static_cast<unsigned>(ceil_div(items, kReduceThreads)),
                    static_cast<unsigned>(std::min<int64_t>(g.C, kMaxGridY)));
  launch<sorted_cells_kernel<scalar_t>>(blocks, dim3(kReduceThreads), 0, stream, sorted_keys.data_ptr<int64_t>(),
                                        order.data_ptr<int64_t>(), weights.data_ptr<acc_t>(), gout.data_ptr<scalar_t>(),
                                        buf.grad_input.data_ptr<scalar_t>(), kg, items, K);
}

// Large tables: atomics (scatter kernel), or the sorted cells in deterministic mode; the grid
// gradient always through the scatter kernel's per-split partial sums.
template <typename scalar_t, int D, int TAPS>
void launch_large_table_backward(const at::Tensor& gout, const at::Tensor& input, const at::Tensor& grid,
                                 BackwardBuffers& buf, const GridGeometry& g, const KernelGeometry& kg,
                                 const SampleParams& sp, bool need_input, bool need_grid, bool deterministic,
                                 Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t point_blocks = g.N * ceil_div(g.P, kPointLanes);
  TORCH_CHECK(point_blocks <= INT_MAX, "sample_grid_backward: too many points for one launch (", g.N * g.P, ")");
  constexpr auto kernel = scatter_backward_kernel<scalar_t, D, TAPS>;
  const int64_t target = resident_blocks<kernel>(kThreads, 0) * sm_count();
  const int64_t splits = std::clamp<int64_t>(ceil_div(target, point_blocks), 1,
                                             std::min<int64_t>(ceil_div(g.C, kChannelLanes), kMaxGridY));
  const bool scatter_input = need_input && !deterministic;
  at::Tensor accum;
  if (scatter_input) accum = at::zeros(input.sizes(), acc_opts);
  if (need_grid) {
    buf.grid_parts = splits;
    buf.grid_partial = at::empty({g.N * g.P, splits, D}, acc_opts);
  }
  if (scatter_input || need_grid) {
    const dim3 blocks(static_cast<unsigned>(point_blocks), static_cast<unsigned>(splits));
    launch<kernel>(blocks, dim3(kPointLanes, kChannelLanes), 0, stream, gout.data_ptr<scalar_t>(),
                   input.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(),
                   scatter_input ? accum.data_ptr<acc_t>() : nullptr,
                   need_grid ? buf.grid_partial.data_ptr<acc_t>() : nullptr, kg, sp);
  }
  if (scatter_input) buf.grad_input = std::is_same<scalar_t, acc_t>::value ? accum : accum.to(input.scalar_type());
  if (need_input && deterministic)
    launch_sorted_cells_backward<scalar_t, D, TAPS>(gout, input, grid, buf, g, kg, sp, stream);
}

// Lanes that reduce one point's grid-gradient parts: enough for every part, up to a warp.
int reduce_lanes(int64_t parts) {
  int lanes = 1;
  while (lanes < parts && lanes < kWarp) lanes *= 2;
  return lanes;
}

// Calls f(std::integral_constant<int, TAPS>{}) with the taps per axis: 4 for bicubic (1-D to
// 3-D tables; the checks reject 4-D), else 2 (nearest uses the first tap only).
template <int D, typename F>
void dispatch_taps(int64_t interpolation, F&& f) {
  if (interpolation != kBicubic) {
    f(std::integral_constant<int, 2>{});
  } else {
    if constexpr (D <= kMaxCubicDim) f(std::integral_constant<int, 4>{});
  }
}

}  // namespace

template <typename scalar_t>
void forward_typed(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const SampleCall& call) {
  const SampleParams sp = sample_params(call.interpolation, call.padding, call.align_corners, call.jitter_std,
                                        call.jitter_prob, call.jitter_mode, call.seed);
  const KernelGeometry kg = kernel_geometry(call.g);
  dispatch_dim(call.g.D, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    dispatch_taps<D>(call.interpolation, [&](auto taps) {
      launch_forward<scalar_t, D, decltype(taps)::value>(input, grid, out, call.g, kg, sp, call.stream);
    });
  });
}

template <typename scalar_t>
void backward_typed(const at::Tensor& gout, const at::Tensor& input, const at::Tensor& grid, BackwardBuffers& buf,
                    const SampleCall& call, bool need_input, bool need_grid, bool deterministic) {
  const GridGeometry& g = call.g;
  const SampleParams sp = sample_params(call.interpolation, call.padding, call.align_corners, call.jitter_std,
                                        call.jitter_prob, call.jitter_mode, call.seed);
  const KernelGeometry kg = kernel_geometry(g);
  Stream stream = call.stream;
  dispatch_dim(g.D, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    dispatch_taps<D>(call.interpolation, [&](auto taps) {
      constexpr int TAPS = decltype(taps)::value;
      bool done = false;
      if (need_input) {
        done = need_grid ? launch_table_backward<scalar_t, D, TAPS, true>(gout, input, grid, buf, g, kg, sp,
                                                                          deterministic, stream)
                         : launch_table_backward<scalar_t, D, TAPS, false>(gout, input, grid, buf, g, kg, sp,
                                                                           deterministic, stream);
      }
      if (!done) {
        launch_large_table_backward<scalar_t, D, TAPS>(gout, input, grid, buf, g, kg, sp, need_input, need_grid,
                                                       deterministic, stream);
      }
      if (need_grid) {
        buf.grad_grid = at::empty(grid.sizes(), grid.options());  // every element written below
        const int lanes = reduce_lanes(buf.grid_parts);
        const int64_t reduce_blocks = ceil_div(g.N * g.P * lanes, kReduceThreads);
        TORCH_CHECK(reduce_blocks <= INT_MAX, "sample_grid_backward: too many points for one launch (", g.N * g.P, ")");
        launch<reduce_grid_kernel<scalar_t, D, TAPS>>(dim3(static_cast<unsigned>(reduce_blocks)), dim3(kReduceThreads),
                                                      0, stream, buf.grid_partial.data_ptr<at::opmath_type<scalar_t>>(),
                                                      buf.grid_parts, lanes, grid.data_ptr<scalar_t>(),
                                                      buf.grad_grid.data_ptr<scalar_t>(), kg, sp);
      }
    });
  });
}

}  // namespace cuda
}  // namespace grad_ext

#define GRAD_EXT_INSTANTIATE_SAMPLE_GRID(scalar_t)                                                                \
  template void grad_ext::cuda::forward_typed<scalar_t>(const at::Tensor&, const at::Tensor&, at::Tensor&,        \
                                                        const grad_ext::cuda::SampleCall&);                       \
  template void grad_ext::cuda::backward_typed<scalar_t>(const at::Tensor&, const at::Tensor&, const at::Tensor&, \
                                                         grad_ext::cuda::BackwardBuffers&,                        \
                                                         const grad_ext::cuda::SampleCall&, bool, bool, bool);
