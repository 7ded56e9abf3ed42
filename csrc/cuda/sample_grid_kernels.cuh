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
//  - owner kernel: large tables in deterministic mode; each thread owns a row of the gradient
//    and sums its point group in a fixed order.
// The grid gradient is summed per channel slice into partial buffers that are reduced in a
// fixed order, so it is deterministic in every mode.
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

// Index into grad_output (and output) of channel c at global point gq = n * P + p.
__device__ __forceinline__ int64_t out_index(const KernelGeometry& g, int64_t gq, int64_t c) {
  const int64_t n = gq / g.P, p = gq - n * g.P;
  return (n * g.C + c) * g.P + p;
}

// Corners of a tile of points kept in shared memory for the whole block (channel-lane kernels).
template <typename acc_t, int D, int TAPS>
struct TileCorners {
  static constexpr int K = Pow<TAPS, D>::value;
  typedef typename TapMask<K>::type Mask;
  int offset[kTilePoints][K];
  acc_t weight[kTilePoints][K];
  Mask valid[kTilePoints];
  acc_t bias[kTilePoints];  // bicubic: F.grid_sample's coefficient * 0 of taps outside (NaN for NaN points)
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

template <typename scalar_t, int D, int TAPS>
__global__ void __launch_bounds__(kMaxSliceChannels)
    forward_channels_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ grid,
                            scalar_t* __restrict__ out, KernelGeometry g, SampleParams sp, int64_t points_per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  typedef TileCorners<acc_t, D, TAPS> TC;
  constexpr int KMax = TC::K;
  GRAD_EXT_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int slice = blockDim.x, tid = threadIdx.x, stride = slice + 1;
  acc_t* tab = reinterpret_cast<acc_t*>(smem_raw);
  auto* tc = reinterpret_cast<TC*>(tab + g.S * stride);

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
      out[out_index(g, point_base + q0 + j, c)] = static_cast<scalar_t>(acc);
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
    const int64_t total_points = g.N * g.P;
#pragma unroll
    for (int a = 0; a < D; ++a) {
      acc_t s = acc_t(0);
      for (int l = 0; l < kChannelLanes; ++l) s += lane_sums[l][threadIdx.x][a];
      grid_partial[(blockIdx.y * total_points + n * g.P + p) * D + a] = s;
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
__host__ __device__ inline int64_t table_smem_bytes(int64_t S, int64_t slice, bool need_grid) {
  const int64_t rows = S + (need_grid ? S : 0) + kTilePoints;
  return rows * (slice + 1) * static_cast<int64_t>(sizeof(acc_t)) +
         static_cast<int64_t>(sizeof(TableTile<acc_t, D, TAPS>));
}

// Grid (groups * slices, 1, N_in); blockDim.x = slice channels (a multiple of 32).
// The outputs, for block (group, slice, b): grad_input_direct (one group: the slice's rows),
// grad_input_partial (deterministic: [group][N_in][C][S]) or grad_input_accum (atomics); the
// grid gradient of each point into grid_partial[slice][point][D].
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
  acc_t* grad = reinterpret_cast<acc_t*>(smem_raw);     // [S][stride]
  acc_t* tab = grad + g.S * stride;                     // [S][stride] (NEED_GRID)
  acc_t* gtile = tab + (NEED_GRID ? g.S * stride : 0);  // [kTilePoints][stride]
  auto* tt = reinterpret_cast<TT*>(gtile + kTilePoints * stride);

  const int64_t group = blockIdx.x / slices, slice_index = blockIdx.x % slices, b = blockIdx.z;
  const int64_t c0 = slice_index * slice;
  const int64_t width = c0 + slice < g.C ? slice : g.C - c0;
  const int64_t npoints = table_points(g);
  const int64_t q_begin = group * points_per_group;
  const int64_t q_end = q_begin + points_per_group < npoints ? q_begin + points_per_group : npoints;
  const int64_t point_base = g.N_in == 1 ? 0 : b * g.P;  // global index of this table's first point
  const int64_t total_points = g.N * g.P;
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
    // The output-gradient tile [point][channel], read along whichever axis is contiguous.
    for (int64_t e = tid; e < static_cast<int64_t>(kTilePoints) * slice; e += slice) {
      int j, cl;
      if (tile_along_points) {
        j = static_cast<int>(e % kTilePoints);
        cl = static_cast<int>(e / kTilePoints);
      } else {
        cl = static_cast<int>(e % slice);
        j = static_cast<int>(e / slice);
      }
      gtile[j * stride + cl] = (j < count && cl < width)
                                   ? static_cast<acc_t>(grad_out[out_index(g, point_base + q0 + j, c0 + cl)])
                                   : acc_t(0);
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
        grid_partial[(slice_index * total_points + point_base + q0 + j) * D + a] = s;
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

// ---- backward: owner kernel (deterministic, large tables) -------------------------------------

template <typename scalar_t, int D, int TAPS>
__global__ void owner_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grid,
                                      at::opmath_type<scalar_t>* __restrict__ partial, KernelGeometry g,
                                      SampleParams sp, int64_t groups, int64_t points_per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = g.N_in * g.C;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * groups) return;
  const int64_t row = idx % rows, group = idx / rows;
  const int64_t b = row / g.C, c = row % g.C;
  const int64_t npoints = table_points(g);
  const int64_t point_base = g.N_in == 1 ? 0 : b * g.P;
  const int64_t q_begin = group * points_per_group;
  const int64_t q_end = q_begin + points_per_group < npoints ? q_begin + points_per_group : npoints;
  typedef PointCorners<acc_t, D, TAPS> PC;
  const int K = sp.interpolation == kNearest ? 1 : PC::K;
  acc_t* out = partial + (group * rows + row) * g.S;
  const JitterParams jitter = device_jitter(sp);
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t gq = point_base + q;
    PC pc;
    device_corners<scalar_t, D, TAPS>(grid, gq, g, sp, jitter, true, false, pc);
    if (pc.valid == 0) continue;
    const acc_t gv = static_cast<acc_t>(grad_out[out_index(g, gq, c)]);
#pragma unroll
    for (int k = 0; k < PC::K; ++k) {
      if (k < K && (pc.valid >> k & 1u)) out[pc.offset[k]] += pc.weight[k] * gv;
    }
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

template <typename scalar_t, int D, int TAPS>
__global__ void reduce_grid_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, int64_t parts,
                                   const scalar_t* __restrict__ grid, scalar_t* __restrict__ grad_grid,
                                   KernelGeometry g, SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total_points = g.N * g.P;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total_points) return;
  const JitterParams jitter = device_jitter(sp);
  PointCorners<acc_t, D, TAPS> pc;
  device_corners<scalar_t, D, TAPS>(grid, i, g, sp, jitter, true, true, pc);
#pragma unroll
  for (int a = 0; a < D; ++a) {
    acc_t s = pc.grad_bias[a];
    for (int64_t j = 0; j < parts; ++j) s += partial[(j * total_points + i) * D + a];
    grad_grid[i * D + (D - 1 - a)] = static_cast<scalar_t>(s * pc.mult[a]);
  }
}

}  // namespace cuda
}  // namespace grad_ext
