// CUDA kernels of sample_grid; the launchers that choose between them are in sample_grid.cu.
//
// Forward:
//  - points kernel: a block covers 32 consecutive points (one per lane, so output rows are
//    written coalesced) times 8 channel lanes; blocks along y split the channels.
//  - channels kernel: for calls with fewer than 32 points per batch (GRAD's global grid in
//    the model's form: one point per image), lanes are channels; the block stages its slice
//    of the table in shared memory once and walks the points, writing along channels.
// Backward, input gradient:
//  - table kernel: small tables (GRAD's local 8x8 and global 4x4 grids). Each thread owns one
//    channel of the block's slice: it adds its points' contributions to its own gradient row
//    in shared memory, in point order, with no atomics, and reads the table slice, also staged
//    in shared memory, for the grid gradient. The output-gradient tile is read along points
//    or along channels, whichever is contiguous. The slice is written once: directly when one
//    block owns it, else as per-block partial sums added in a fixed order (deterministic mode)
//    or with one atomic per element and block.
//  - scatter kernel: large tables, one global atomic per corner (as F.grid_sample).
//  - sorted-cells kernels: large tables in deterministic mode. The cell keys kernel lists each
//    (point, tap) with its table cell and weight; the launcher sorts the list by cell, stably
//    (torch's sort); one thread per cell and channel then sums its run in (point, tap) order
//    and writes the cell once.
// The grid gradient is summed per channel slice into partial buffers that are reduced in a
// fixed order (in parallel: a group of lanes per point and a fixed shuffle tree), so it is
// deterministic in every mode.
#pragma once
#include <ATen/OpMathType.h>

#include "cuda/runtime.h"
#include "grid_common.h"
#include "philox.h"

namespace grad_ext {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Points kernel and scatter kernel: 32 point lanes x 8 channel lanes.
constexpr int kPointLanes = 32;
constexpr int kChannelLanes = 8;
constexpr int kThreads = kPointLanes * kChannelLanes;
// Channels kernel and table kernel: up to this many channels (threads) per block, and the
// points whose corners are set up together (one per lane of the first warp).
constexpr int kMaxSliceChannels = 256;
constexpr int kTilePoints = 32;
// Table kernel: the points whose grid-gradient sums are kept in registers at a time (one
// shuffle reduce-scatter each), a multiple of 8.
constexpr int kGridChunk = 8;
// Threads per block of the reductions and the sorted-cells kernels.
constexpr int kReduceThreads = 256;

__host__ __device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct KernelGeometry {
  int64_t N, N_in, C, P, S;
  int64_t sizes[kMaxDim];
  int64_t strides[kMaxDim];
};

struct SampleParams {
  int interpolation;
  int padding;
  bool align_corners;
  float jitter_std;
  float jitter_prob;
  int jitter_mode;
  const int64_t* seed;  // device pointer to [seed, offset], or null without jitter
};

__device__ __forceinline__ JitterParams device_jitter(const SampleParams& sp) {
  if (sp.seed == nullptr) return JitterParams{};
  return make_jitter(sp.jitter_std, sp.jitter_prob, sp.jitter_mode, sp.seed[0], sp.seed[1]);
}

// Corners (taps) of one point; `backward` selects F.grid_sample's backward handling of NaN.
// TAPS: taps per axis, 4 for bicubic, else 2 (nearest uses tap 0 only).
template <typename scalar_t, int D, int TAPS>
__device__ __forceinline__ void device_corners(const scalar_t* __restrict__ grid, int64_t point,
                                               const KernelGeometry& g, const SampleParams& sp,
                                               const JitterParams& jitter, bool backward, bool with_grad,
                                               PointCorners<at::opmath_type<scalar_t>, D, TAPS>& pc) {
  using acc_t = at::opmath_type<scalar_t>;
  float noise[4];
  jitter_point(jitter, point, noise);
  acc_t coords[D];
#pragma unroll
  for (int k = 0; k < D; ++k) coords[k] = static_cast<acc_t>(grid[point * D + k]) + static_cast<acc_t>(noise[k]);
  setup_corners<acc_t, D, TAPS>(coords, g.sizes, g.strides, sp.interpolation, sp.padding, sp.align_corners,
                                backward ? cuda_backward_policy() : cuda_policy(), with_grad, pc);
}

// Points handled by table batch b: all N*P points when the table is shared, else batch b's.
__device__ __forceinline__ int64_t table_points(const KernelGeometry& g) { return g.N_in == 1 ? g.N * g.P : g.P; }

// Offset of `point`'s output row for channel 0: (n * C) * P + p for point = n * P + p; channel
// c's value is at base + c * P.
__device__ __forceinline__ int64_t out_base(const KernelGeometry& g, int64_t point) {
  const int64_t n = point / g.P;
  return n * g.C * g.P + (point - n * g.P);
}

// Regions of a block's dynamic shared memory, placed in order, each at the alignment of its
// type (at most the 16 bytes that GRAD_EXT_DYNAMIC_SHARED guarantees). A kernel and the size
// its launcher asks for come from the same layout.
struct SharedLayout {
  int64_t bytes = 0;
  template <typename T>
  __host__ __device__ int64_t place(int64_t count) {
    static_assert(alignof(T) <= kDynamicSharedAlignment, "GRAD_EXT_DYNAMIC_SHARED aligns to 16 bytes only");
    const int64_t offset = (bytes + static_cast<int64_t>(alignof(T)) - 1) / static_cast<int64_t>(alignof(T)) *
                           static_cast<int64_t>(alignof(T));
    bytes = offset + count * static_cast<int64_t>(sizeof(T));
    return offset;
  }
};

// Corners of a tile of points kept in shared memory for the whole block (channel-lane kernels).
template <typename acc_t, int D, int TAPS>
struct TileCorners {
  static constexpr int K = Pow<TAPS, D>::value;
  typedef typename TapMask<K>::type Mask;
  int offset[kTilePoints][K];
  acc_t weight[kTilePoints][K];
  Mask valid[kTilePoints];
  acc_t bias[kTilePoints];        // bicubic: F.grid_sample's coefficient * 0 of taps outside (NaN for NaN points)
  int64_t out_base[kTilePoints];  // out_base() of each point
};

// ---- forward: points kernel ----------------------------------------------------------------

template <typename scalar_t, int D, int TAPS>
__global__ void __launch_bounds__(kThreads)
    forward_points_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ grid,
                          scalar_t* __restrict__ out, KernelGeometry g, SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles_per_batch = div_up(g.P, kPointLanes);
  const int64_t n = blockIdx.x / tiles_per_batch;
  const int64_t p = (blockIdx.x % tiles_per_batch) * kPointLanes + threadIdx.x;
  if (p >= g.P) return;
  const JitterParams jitter = device_jitter(sp);
  typedef PointCorners<acc_t, D, TAPS> PC;
  PC pc;
  device_corners<scalar_t, D, TAPS>(grid, n * g.P + p, g, sp, jitter, false, false, pc);
  const int K = sp.interpolation == kNearest ? 1 : PC::K;
  const scalar_t* table = input + (g.N_in == 1 ? 0 : n) * g.C * g.S;
  for (int64_t c = blockIdx.y * kChannelLanes + threadIdx.y; c < g.C; c += kChannelLanes * gridDim.y) {
    const scalar_t* row = table + c * g.S;
    acc_t acc = pc.bias;
#pragma unroll
    for (int k = 0; k < PC::K; ++k) {
      if (k < K && (pc.valid >> k & 1u)) acc += pc.weight[k] * static_cast<acc_t>(row[pc.offset[k]]);
    }
    out[(n * g.C + c) * g.P + p] = static_cast<scalar_t>(acc);
  }
}

// ---- forward: channels kernel --------------------------------------------------------------
// Grid (slices, groups, N_in); blockDim.x = slice channels. Shared memory: the slice's table
// as [cell][slice + 1] (the odd row stride spreads both the staging writes and the reads of
// one cell by consecutive channels over the banks), then the tile's corners.

template <typename acc_t, int D, int TAPS>
struct ChannelsShared {
  int64_t table, corners, bytes;
  __host__ __device__ ChannelsShared(int64_t S, int64_t slice) {
    SharedLayout l;
    table = l.place<acc_t>(S * (slice + 1));
    corners = l.place<TileCorners<acc_t, D, TAPS>>(1);
    bytes = l.bytes;
  }
};

template <typename scalar_t, int D, int TAPS>
__global__ void __launch_bounds__(kMaxSliceChannels)
    forward_channels_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ grid,
                            scalar_t* __restrict__ out, KernelGeometry g, SampleParams sp, int64_t points_per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  typedef TileCorners<acc_t, D, TAPS> TC;
  constexpr int KMax = TC::K;
  GRAD_EXT_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int slice = blockDim.x, tid = threadIdx.x, stride = slice + 1;
  const ChannelsShared<acc_t, D, TAPS> layout(g.S, slice);
  acc_t* tab = reinterpret_cast<acc_t*>(smem_raw + layout.table);
  auto* tc = reinterpret_cast<TC*>(smem_raw + layout.corners);

  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * slice, b = blockIdx.z;
  const int64_t width = c0 + slice < g.C ? slice : g.C - c0;
  const int64_t npoints = table_points(g);
  const int64_t q_begin = static_cast<int64_t>(blockIdx.y) * points_per_group;
  const int64_t q_end = q_begin + points_per_group < npoints ? q_begin + points_per_group : npoints;
  const int64_t point_base = g.N_in == 1 ? 0 : b * g.P;
  const scalar_t* table = input + (b * g.C + c0) * g.S;
  for (int64_t e = tid; e < width * g.S; e += slice) {  // coalesced: the slice's rows are contiguous
    const int64_t cl = e / g.S, s = e - cl * g.S;
    tab[s * stride + cl] = static_cast<acc_t>(table[e]);
  }
  const JitterParams jitter = device_jitter(sp);
  const int K = sp.interpolation == kNearest ? 1 : KMax;
  const bool active = tid < width;
  const int64_t c = c0 + tid;
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kTilePoints) {
    __syncthreads();  // table staged / previous tile consumed
    if (tid < kTilePoints) {
      const int64_t q = q0 + tid;
      typename TC::Mask valid = 0;
      acc_t bias = acc_t(0);
      if (q < q_end) {
        PointCorners<acc_t, D, TAPS> pc;
        device_corners<scalar_t, D, TAPS>(grid, point_base + q, g, sp, jitter, false, false, pc);
        valid = pc.valid;
        bias = pc.bias;  // bilinear/nearest: 0 (the CUDA policy moves non-finite points outside)
#pragma unroll
        for (int k = 0; k < KMax; ++k) {
          tc->offset[tid][k] = static_cast<int>(pc.offset[k]);
          tc->weight[tid][k] = pc.weight[k];
        }
      }
      tc->valid[tid] = valid;
      tc->bias[tid] = bias;
      tc->out_base[tid] = out_base(g, point_base + (q < q_end ? q : q0));
    }
    __syncthreads();
    if (!active) continue;
    const int count = q_end - q0 < kTilePoints ? static_cast<int>(q_end - q0) : kTilePoints;
    for (int j = 0; j < count; ++j) {
      const typename TC::Mask valid = tc->valid[j];
      acc_t acc = tc->bias[j];
#pragma unroll
      for (int k = 0; k < KMax; ++k) {
        if (k < K && (valid >> k & 1u)) acc += tc->weight[j][k] * tab[tc->offset[j][k] * stride + tid];
      }
      out[tc->out_base[j] + c * g.P] = static_cast<scalar_t>(acc);
    }
  }
}

// ---- backward: scatter kernel (also the grid gradient for large tables) ---------------------

template <typename scalar_t, int D, int TAPS>
__global__ void __launch_bounds__(kThreads)
    scatter_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input,
                            const scalar_t* __restrict__ grid, at::opmath_type<scalar_t>* __restrict__ grad_input,
                            at::opmath_type<scalar_t>* __restrict__ grid_partial, KernelGeometry g, SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  typedef PointCorners<acc_t, D, TAPS> PC;
  constexpr int KMax = PC::K;
  __shared__ acc_t lane_sums[kChannelLanes][kPointLanes][D];
  const int64_t tiles_per_batch = div_up(g.P, kPointLanes);
  const int64_t n = blockIdx.x / tiles_per_batch;
  const int64_t p = (blockIdx.x % tiles_per_batch) * kPointLanes + threadIdx.x;
  const bool active = p < g.P;
  const int K = sp.interpolation == kNearest ? 1 : KMax;
  acc_t gsum[D];
#pragma unroll
  for (int a = 0; a < D; ++a) gsum[a] = acc_t(0);
  if (active) {
    const JitterParams jitter = device_jitter(sp);
    PC pc;
    device_corners<scalar_t, D, TAPS>(grid, n * g.P + p, g, sp, jitter, true, grid_partial != nullptr, pc);
    // Bilinear keeps the K x D weight derivatives in registers; bicubic's 4^D x D would spill,
    // so it forms them from the per-axis factors in the loop.
    constexpr int KD = TAPS == 2 ? KMax : 1;
    acc_t dw[KD][D];
    if constexpr (TAPS == 2) {
      if (grid_partial != nullptr) {
#pragma unroll
        for (int k = 0; k < KMax; ++k)
#pragma unroll
          for (int a = 0; a < D; ++a) dw[k][a] = corner_weight_grad(pc, k, a);
      }
    }
    const int64_t b = g.N_in == 1 ? 0 : n;
    const scalar_t* table = input + b * g.C * g.S;
    acc_t* gtable = grad_input != nullptr ? grad_input + b * g.C * g.S : nullptr;
    for (int64_t c = blockIdx.y * kChannelLanes + threadIdx.y; c < g.C; c += kChannelLanes * gridDim.y) {
      const acc_t gv = static_cast<acc_t>(grad_out[(n * g.C + c) * g.P + p]);
#pragma unroll
      for (int k = 0; k < KMax; ++k) {
        if (k >= K || !(pc.valid >> k & 1u)) continue;
        if (gtable != nullptr) atomicAdd(gtable + c * g.S + pc.offset[k], pc.weight[k] * gv);
        if (grid_partial != nullptr) {
          const acc_t v = gv * static_cast<acc_t>(table[c * g.S + pc.offset[k]]);
#pragma unroll
          for (int a = 0; a < D; ++a) {
            if constexpr (TAPS == 2) {
              gsum[a] += dw[k][a] * v;
            } else {
              gsum[a] += corner_weight_grad(pc, k, a) * v;
            }
          }
        }
      }
    }
  }
  if (grid_partial == nullptr) return;
#pragma unroll
  for (int a = 0; a < D; ++a) lane_sums[threadIdx.y][threadIdx.x][a] = gsum[a];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int a = 0; a < D; ++a) {
      acc_t s = acc_t(0);
      for (int l = 0; l < kChannelLanes; ++l) s += lane_sums[l][threadIdx.x][a];
      grid_partial[((n * g.P + p) * gridDim.y + blockIdx.y) * D + a] = s;
    }
  }
}

// ---- backward: table kernel -----------------------------------------------------------------

// Sums v[0..7] over the 32 lanes of a warp in a fixed order (a reduce-scatter: 9 shuffles
// instead of 40); lane l returns the total of value ((l >> 4) & 1) * 4 + ((l >> 3) & 1) * 2 +
// ((l >> 2) & 1).
template <typename T>
__device__ __forceinline__ T warp_reduce_scatter8(T v[8], int lane) {
#pragma unroll
  for (int w = 16, half = 4; w >= 4; w >>= 1, half >>= 1) {
    const bool upper = lane & w;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const T send = upper ? v[i] : v[i + half];
      const T keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, w);
    }
  }
  T s = v[0];
  s += __shfl_xor_sync(kFullMask, s, 2);
  s += __shfl_xor_sync(kFullMask, s, 1);
  return s;
}

__device__ __forceinline__ int reduce_scatter8_index(int lane) {
  return ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
}

template <typename acc_t, int D, int TAPS>
struct TableTile {
  static constexpr int K = Pow<TAPS, D>::value;
  typedef typename TileCorners<acc_t, D, TAPS>::Mask Mask;
  TileCorners<acc_t, D, TAPS> corners;
  acc_t dw[kTilePoints][K][D];
  acc_t warp_sums[kMaxSliceChannels / kWarp][kTilePoints][D];
};

// Shared memory of the table kernel for a slice of `slice` channels: the gradient rows, the
// table rows (grid gradient only) and the output-gradient tile, each [rows][slice + 1], then
// the tile's corners and sums.
template <typename acc_t, int D, int TAPS>
struct TableShared {
  int64_t grad, table, tile, extras, bytes;
  __host__ __device__ TableShared(int64_t S, int64_t slice, bool need_grid) {
    SharedLayout l;
    grad = l.place<acc_t>(S * (slice + 1));
    table = l.place<acc_t>(need_grid ? S * (slice + 1) : 0);
    tile = l.place<acc_t>(kTilePoints * (slice + 1));
    extras = l.place<TableTile<acc_t, D, TAPS>>(1);
    bytes = l.bytes;
  }
};

// Grid (groups * slices, 1, N_in); blockDim.x = slice channels (a multiple of 32).
// The outputs, for block (group, slice, b): grad_input_direct (one group: the slice's rows),
// grad_input_partial (deterministic: [group][N_in][C][S]) or grad_input_accum (atomics); the
// grid gradient of each point into grid_partial[point][slice][D].
template <typename scalar_t, int D, int TAPS, bool NEED_GRID>
__global__ void __launch_bounds__(kMaxSliceChannels)
    table_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ grid, scalar_t* __restrict__ grad_input_direct,
                          at::opmath_type<scalar_t>* __restrict__ grad_input_accum,
                          at::opmath_type<scalar_t>* __restrict__ grad_input_partial,
                          at::opmath_type<scalar_t>* __restrict__ grid_partial, KernelGeometry g, SampleParams sp,
                          int64_t slices, int64_t points_per_group, bool tile_along_points) {
  using acc_t = at::opmath_type<scalar_t>;
  typedef TableTile<acc_t, D, TAPS> TT;
  constexpr int KMax = TT::K;
  GRAD_EXT_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int slice = blockDim.x, tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int warps = slice / kWarp, stride = slice + 1;
  const TableShared<acc_t, D, TAPS> layout(g.S, slice, NEED_GRID);
  acc_t* grad = reinterpret_cast<acc_t*>(smem_raw + layout.grad);   // [S][stride]
  acc_t* tab = reinterpret_cast<acc_t*>(smem_raw + layout.table);   // [S][stride] (NEED_GRID)
  acc_t* gtile = reinterpret_cast<acc_t*>(smem_raw + layout.tile);  // [kTilePoints][stride]
  auto* tt = reinterpret_cast<TT*>(smem_raw + layout.extras);

  const int64_t group = blockIdx.x / slices, slice_index = blockIdx.x % slices, b = blockIdx.z;
  const int64_t c0 = slice_index * slice;
  const int64_t width = c0 + slice < g.C ? slice : g.C - c0;
  const int64_t npoints = table_points(g);
  const int64_t q_begin = group * points_per_group;
  const int64_t q_end = q_begin + points_per_group < npoints ? q_begin + points_per_group : npoints;
  const int64_t point_base = g.N_in == 1 ? 0 : b * g.P;  // global index of this table's first point
  const JitterParams jitter = device_jitter(sp);
  const int K = sp.interpolation == kNearest ? 1 : KMax;
  const bool active = tid < width;
  const scalar_t* table = input + (b * g.C + c0) * g.S;

  for (int64_t i = tid; i < g.S * stride; i += slice) grad[i] = acc_t(0);
  if (NEED_GRID) {
    for (int64_t e = tid; e < width * g.S; e += slice) {
      const int64_t cl = e / g.S, s = e - cl * g.S;
      tab[s * stride + cl] = static_cast<acc_t>(table[e]);
    }
  }

  for (int64_t q0 = q_begin; q0 < q_end; q0 += kTilePoints) {
    const int count = q_end - q0 < kTilePoints ? static_cast<int>(q_end - q0) : kTilePoints;
    __syncthreads();  // previous tile consumed
    if (tid < kTilePoints) {
      typename TT::Mask valid = 0;
      if (tid < count) {
        PointCorners<acc_t, D, TAPS> pc;
        device_corners<scalar_t, D, TAPS>(grid, point_base + q0 + tid, g, sp, jitter, true, NEED_GRID, pc);
        valid = pc.valid;
#pragma unroll
        for (int k = 0; k < KMax; ++k) {
          tt->corners.offset[tid][k] = static_cast<int>(pc.offset[k]);
          tt->corners.weight[tid][k] = pc.weight[k];
          if (NEED_GRID) {
#pragma unroll
            for (int a = 0; a < D; ++a) tt->dw[tid][k][a] = corner_weight_grad(pc, k, a);
          }
        }
      }
      tt->corners.valid[tid] = valid;
    }
    // The output-gradient tile [point][channel], read along whichever axis is contiguous,
    // with one division per thread and tile.
    if (tile_along_points) {  // a thread keeps its point (slice is a multiple of 32)
      const int j = tid % kTilePoints;
      const int64_t base = out_base(g, point_base + q0 + (j < count ? j : 0));
      for (int cl = tid / kTilePoints; cl < slice; cl += slice / kTilePoints) {
        gtile[j * stride + cl] =
            (j < count && cl < width) ? static_cast<acc_t>(grad_out[base + (c0 + cl) * g.P]) : acc_t(0);
      }
    } else {  // a thread keeps its channel and walks the tile's points
      const int64_t first = point_base + q0;
      int64_t n = first / g.P, p = first - n * g.P;
      for (int j = 0; j < kTilePoints; ++j) {
        gtile[j * stride + tid] =
            (j < count && tid < width) ? static_cast<acc_t>(grad_out[(n * g.C + c0 + tid) * g.P + p]) : acc_t(0);
        if (++p == g.P) {
          p = 0;
          ++n;
        }
      }
    }
    __syncthreads();
    for (int j0 = 0; j0 < count; j0 += kGridChunk) {
      acc_t gsum[D][kGridChunk];
#pragma unroll
      for (int a = 0; a < D; ++a)
#pragma unroll
        for (int m = 0; m < kGridChunk; ++m) gsum[a][m] = acc_t(0);
      if (active) {
#pragma unroll
        for (int m = 0; m < kGridChunk; ++m) {
          const int j = j0 + m;
          if (j >= count) break;
          const typename TT::Mask valid = tt->corners.valid[j];  // the same for the whole block: no divergence
          if (valid == 0) continue;                              // wholly outside: adds nothing, even for NaN gradients
          const acc_t gv = gtile[j * stride + tid];
#pragma unroll
          for (int k = 0; k < KMax; ++k) {
            if (k >= K || !(valid >> k & 1u)) continue;
            const int cell = tt->corners.offset[j][k] * stride + tid;
            grad[cell] += tt->corners.weight[j][k] * gv;  // this thread's own row: no atomics
            if (NEED_GRID) {
              const acc_t v = gv * tab[cell];
#pragma unroll
              for (int a = 0; a < D; ++a) gsum[a][m] += tt->dw[j][k][a] * v;
            }
          }
        }
      }
      if (NEED_GRID) {
        // Sum over the warp's channels (inactive lanes add zeros), one value per point.
#pragma unroll
        for (int a = 0; a < D; ++a) {
          const acc_t s = warp_reduce_scatter8(gsum[a], lane);
          const int m = reduce_scatter8_index(lane);
          if ((lane & 3) == 0 && j0 + m < kTilePoints) tt->warp_sums[warp][j0 + m][a] = s;
        }
      }
    }
    if (NEED_GRID) {
      __syncthreads();
      // Sum over the block's warps in order, one write per point and slice.
      for (int e = tid; e < count * D; e += slice) {
        const int j = e / D, a = e - j * D;
        acc_t s = acc_t(0);
        for (int w = 0; w < warps; ++w) s += tt->warp_sums[w][j][a];
        grid_partial[((point_base + q0 + j) * slices + slice_index) * D + a] = s;
      }
    }
  }
  __syncthreads();
  // Write the slice's gradient out, along its contiguous rows.
  for (int64_t e = tid; e < width * g.S; e += slice) {
    const int64_t cl = e / g.S, s = e - cl * g.S;
    const acc_t v = grad[s * stride + cl];
    const int64_t out = (b * g.C + c0) * g.S + e;
    if (grad_input_direct != nullptr) {
      grad_input_direct[out] = static_cast<scalar_t>(v);
    } else if (grad_input_partial != nullptr) {
      grad_input_partial[group * g.N_in * g.C * g.S + out] = v;
    } else {
      atomicAdd(grad_input_accum + out, v);
    }
  }
}

// ---- backward: sorted-cells kernels (deterministic, large tables) ------------------------------

// The key of a tap outside the table: after every cell when sorted.
constexpr int64_t kNoCell = INT64_MAX;

// One thread per point: the key (table batch * S + cell) and weight of each of its K taps, at
// item point * K + k.
template <typename scalar_t, int D, int TAPS>
__global__ void __launch_bounds__(kReduceThreads)
    cell_keys_kernel(const scalar_t* __restrict__ grid, int64_t* __restrict__ keys,
                     at::opmath_type<scalar_t>* __restrict__ weights, KernelGeometry g, SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  typedef PointCorners<acc_t, D, TAPS> PC;
  const int64_t point = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (point >= g.N * g.P) return;
  PC pc;
  device_corners<scalar_t, D, TAPS>(grid, point, g, sp, device_jitter(sp), true, false, pc);
  const int64_t first = (g.N_in == 1 ? 0 : point / g.P) * g.S;
#pragma unroll
  for (int k = 0; k < PC::K; ++k) {
    const bool valid = (k == 0 || sp.interpolation != kNearest) && (pc.valid >> k & 1u);
    keys[point * PC::K + k] = valid ? first + pc.offset[k] : kNoCell;
    weights[point * PC::K + k] = pc.weight[k];
  }
}

// Grid (items / threads, channel groups): the thread at the first item of a cell's run in the
// sorted keys adds the run's contributions in (point, tap) order, for its channels, and writes
// the cell once; cells without taps stay as the launcher zeroed them.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    sorted_cells_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ order,
                        const at::opmath_type<scalar_t>* __restrict__ weights, const scalar_t* __restrict__ grad_out,
                        scalar_t* __restrict__ grad_input, KernelGeometry g, int64_t items, int taps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= items) return;
  const int64_t key = keys[i];
  if (key == kNoCell || (i > 0 && keys[i - 1] == key)) return;
  const int64_t b = key / g.S, cell = key - b * g.S;
  for (int64_t c = blockIdx.y; c < g.C; c += gridDim.y) {
    acc_t s = acc_t(0);
    for (int64_t j = i; j < items && keys[j] == key; ++j) {
      const int64_t item = order[j];
      s += weights[item] * static_cast<acc_t>(grad_out[out_base(g, item / taps) + c * g.P]);
    }
    grad_input[(b * g.C + c) * g.S + cell] = static_cast<scalar_t>(s);
  }
}

// ---- reductions ------------------------------------------------------------------------------

// out[e] = sum over j = 0..parts-1, in that order, of partial[j][e].
template <typename scalar_t>
__global__ void reduce_partials_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, int64_t parts,
                                       int64_t numel, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= numel) return;
  acc_t s = acc_t(0);
  for (int64_t j = 0; j < parts; ++j) s += partial[j * numel + e];
  out[e] = static_cast<scalar_t>(s);
}

// The grid gradient of each point from its parts' sums, partial[point][part][D]: a group of
// `lanes` consecutive lanes (a power of 2 up to 32) per point, lane l adding parts l, l + lanes,
// ... in order, then a fixed shuffle tree over the group; the group's first lane writes. The
// order of the additions depends on `parts` alone, so the result is the same in every run.
template <typename scalar_t, int D, int TAPS>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_grid_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, int64_t parts, int lanes,
                       const scalar_t* __restrict__ grid, scalar_t* __restrict__ grad_grid, KernelGeometry g,
                       SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t i = t / lanes;
  const int lane = static_cast<int>(t % lanes);
  const bool active = i < g.N * g.P;  // the others still take part in the shuffles
  acc_t s[D];
#pragma unroll
  for (int a = 0; a < D; ++a) s[a] = acc_t(0);
  if (active) {
    for (int64_t j = lane; j < parts; j += lanes) {
#pragma unroll
      for (int a = 0; a < D; ++a) s[a] += partial[(i * parts + j) * D + a];
    }
  }
  for (int w = lanes / 2; w > 0; w >>= 1) {
#pragma unroll
    for (int a = 0; a < D; ++a) s[a] += __shfl_xor_sync(kFullMask, s[a], w, lanes);
  }
  if (!active || lane != 0) return;
  PointCorners<acc_t, D, TAPS> pc;
  device_corners<scalar_t, D, TAPS>(grid, i, g, sp, device_jitter(sp), true, true, pc);
#pragma unroll
  for (int a = 0; a < D; ++a)
    grad_grid[i * D + (D - 1 - a)] = static_cast<scalar_t>((pc.grad_bias[a] + s[a]) * pc.mult[a]);
}

}  // namespace cuda
}  // namespace grad_ext
