// CUDA kernels of sample_grid.
//
// Forward: a block covers 32 consecutive points (one per lane, so output rows are written
// coalesced) times 8 channel lanes; blocks along y split the channels, so a call with few
// points and many channels (GRAD's global grid: 64 points, 169,344 channels) still fills
// the GPU, and each thread computes its point's corners once for all its channels.
//
// Backward, input gradient, chosen by shape:
//  - table kernel: when a channel row of the table is small (GRAD's local 8x8 grid, the
//    4x4 global grid), a block keeps the gradient of a slice of channels in shared memory
//    and accumulates it there with lanes over channels (no two lanes of a warp hit the
//    same address), then writes each element once: directly when the block owns its
//    slice, otherwise through per-block partial sums that are added in a fixed order
//    (deterministic mode) or with one atomic per element and block.
//  - scatter kernel: large tables, one global atomic per corner (as F.grid_sample).
//  - owner kernel: large tables in deterministic mode; each thread owns rows of the
//    gradient and sums point groups in a fixed order.
// The grid gradient is always summed per channel block into partial buffers reduced in a
// fixed order, so it is deterministic in every mode.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "grid_common.h"
#include "philox.h"
#include "sample_grid.h"

namespace grad_ext {
namespace {

constexpr int kPointLanes = 32;
constexpr int kChannelLanes = 8;
constexpr int kThreads = kPointLanes * kChannelLanes;
constexpr int64_t kSmemBudget = 48 * 1024;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

KernelGeometry kernel_geometry(const GridGeometry& g) {
  KernelGeometry k{g.N, g.N_in, g.C, g.P, g.S, {1, 1, 1, 1}, {0, 0, 0, 0}};
  for (int a = 0; a < kMaxDim; ++a) {
    k.sizes[a] = g.sizes[a];
    k.strides[a] = g.strides[a];
  }
  return k;
}

__device__ __forceinline__ JitterParams device_jitter(const SampleParams& sp) {
  if (sp.seed == nullptr) return JitterParams{};
  return make_jitter(sp.jitter_std, sp.jitter_prob, sp.jitter_mode, sp.seed[0], sp.seed[1]);
}

template <typename scalar_t, int D>
__device__ __forceinline__ void device_corners(const scalar_t* __restrict__ grid, int64_t point,
                                               const KernelGeometry& g, const SampleParams& sp,
                                               const JitterParams& jitter, bool with_grad,
                                               PointCorners<at::opmath_type<scalar_t>, D>& pc) {
  using acc_t = at::opmath_type<scalar_t>;
  float noise[4];
  jitter_point(jitter, point, noise);
  acc_t coords[D];
#pragma unroll
  for (int k = 0; k < D; ++k) coords[k] = static_cast<acc_t>(grid[point * D + k]) + static_cast<acc_t>(noise[k]);
  setup_corners<acc_t, D>(coords, g.sizes, g.strides, sp.interpolation, sp.padding, sp.align_corners,
                          cuda_policy(), with_grad, pc);
}

// ---- forward ------------------------------------------------------------------------------

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const scalar_t* __restrict__ input,
                                                           const scalar_t* __restrict__ grid,
                                                           scalar_t* __restrict__ out, KernelGeometry g,
                                                           SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles_per_batch = ceil_div(g.P, kPointLanes);
  const int64_t n = blockIdx.x / tiles_per_batch;
  const int64_t p = (blockIdx.x % tiles_per_batch) * kPointLanes + threadIdx.x;
  if (p >= g.P) return;
  const JitterParams jitter = device_jitter(sp);
  PointCorners<acc_t, D> pc;
  device_corners<scalar_t, D>(grid, n * g.P + p, g, sp, jitter, false, pc);
  const int K = sp.interpolation == kNearest ? 1 : (1 << D);
  const scalar_t* table = input + (g.N_in == 1 ? 0 : n) * g.C * g.S;
  for (int64_t c = blockIdx.y * kChannelLanes + threadIdx.y; c < g.C; c += kChannelLanes * gridDim.y) {
    const scalar_t* row = table + c * g.S;
    acc_t acc = pc.bias;
#pragma unroll
    for (int k = 0; k < (1 << D); ++k) {
      if (k < K && (pc.valid >> k & 1u)) acc += pc.weight[k] * static_cast<acc_t>(row[pc.offset[k]]);
    }
    out[(n * g.C + c) * g.P + p] = static_cast<scalar_t>(acc);
  }
}

// ---- backward: scatter kernel (also the grid gradient for large tables) ---------------------

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads) scatter_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input, const scalar_t* __restrict__ grid,
    at::opmath_type<scalar_t>* __restrict__ grad_input, at::opmath_type<scalar_t>* __restrict__ grid_partial,
    KernelGeometry g, SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KMax = 1 << D;
  __shared__ acc_t lane_sums[kChannelLanes][kPointLanes][D];
  const int64_t tiles_per_batch = ceil_div(g.P, kPointLanes);
  const int64_t n = blockIdx.x / tiles_per_batch;
  const int64_t p = (blockIdx.x % tiles_per_batch) * kPointLanes + threadIdx.x;
  const bool active = p < g.P;
  const bool bilinear = sp.interpolation == kBilinear;
  const int K = bilinear ? KMax : 1;
  acc_t gsum[D];
#pragma unroll
  for (int a = 0; a < D; ++a) gsum[a] = acc_t(0);
  if (active) {
    const JitterParams jitter = device_jitter(sp);
    PointCorners<acc_t, D> pc;
    device_corners<scalar_t, D>(grid, n * g.P + p, g, sp, jitter, grid_partial != nullptr, pc);
    acc_t dw[KMax][D];
    if (grid_partial != nullptr) {
#pragma unroll
      for (int k = 0; k < KMax; ++k)
#pragma unroll
        for (int a = 0; a < D; ++a) dw[k][a] = corner_weight_grad(pc, k, a);
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
          for (int a = 0; a < D; ++a) gsum[a] += dw[k][a] * v;
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

// Points handled by table batch b: all N*P points when the table is shared, else batch b's.
__device__ __forceinline__ int64_t table_points(const KernelGeometry& g) { return g.N_in == 1 ? g.N * g.P : g.P; }

template <typename acc_t, int D>
struct TableSmem {
  // Carved out of dynamic shared memory: [slice rows | gout tile | weights | dw | offsets | valid]
  acc_t* rows;     // [slice_channels][S + 1]
  acc_t* gtile;    // [32 channels][33]
  acc_t* weight;   // [32 points][K]
  acc_t* dw;       // [32 points][K][D]
  int* offset;     // [32 points][K]
  unsigned* valid; // [32 points]
};

template <typename acc_t, int D>
__host__ __device__ int64_t table_fixed_smem() {
  constexpr int K = 1 << D;
  return (32 * 33 + 32 * K + 32 * K * D) * static_cast<int64_t>(sizeof(acc_t)) + 32 * K * 4 + 32 * 4;
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads) table_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input, const scalar_t* __restrict__ grid,
    scalar_t* __restrict__ grad_input_direct, at::opmath_type<scalar_t>* __restrict__ grad_input_accum,
    at::opmath_type<scalar_t>* __restrict__ grad_input_partial, at::opmath_type<scalar_t>* __restrict__ grid_partial,
    KernelGeometry g, SampleParams sp, int64_t slice_channels, int64_t points_per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KMax = 1 << D;
  extern __shared__ unsigned char smem_raw[];
  const int64_t row_len = g.S + 1;  // padded: lanes (channels) fall in different banks
  TableSmem<acc_t, D> sm;
  sm.rows = reinterpret_cast<acc_t*>(smem_raw);
  sm.gtile = sm.rows + slice_channels * row_len;
  sm.weight = sm.gtile + 32 * 33;
  sm.dw = sm.weight + 32 * KMax;
  sm.offset = reinterpret_cast<int*>(sm.dw + 32 * KMax * D);
  sm.valid = reinterpret_cast<unsigned*>(sm.offset + 32 * KMax);

  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kPointLanes + tx;
  const bool bilinear = sp.interpolation == kBilinear;
  const int K = bilinear ? KMax : 1;
  const bool need_grid = grid_partial != nullptr;
  const int64_t group = blockIdx.x, slice = blockIdx.y, b = blockIdx.z;
  const int64_t c0 = slice * slice_channels;
  const int64_t c1 = c0 + slice_channels < g.C ? c0 + slice_channels : g.C;
  const int64_t npoints = table_points(g);
  const int64_t q_begin = group * points_per_group;
  const int64_t q_end = q_begin + points_per_group < npoints ? q_begin + points_per_group : npoints;
  const int64_t point_base = g.N_in == 1 ? 0 : b * g.P;  // global index of this table's first point
  const scalar_t* table = input + b * g.C * g.S;
  const JitterParams jitter = device_jitter(sp);

  for (int64_t i = tid; i < slice_channels * row_len; i += kThreads) sm.rows[i] = acc_t(0);

  for (int64_t q0 = q_begin; q0 < q_end; q0 += 32) {
    __syncthreads();  // previous tile fully consumed
    if (ty == 0) {
      const int64_t q = q0 + tx;
      if (q < q_end) {
        PointCorners<acc_t, D> pc;
        device_corners<scalar_t, D>(grid, point_base + q, g, sp, jitter, need_grid, pc);
        sm.valid[tx] = pc.valid;
#pragma unroll
        for (int k = 0; k < KMax; ++k) {
          sm.offset[tx * KMax + k] = static_cast<int>(pc.offset[k]);
          sm.weight[tx * KMax + k] = pc.weight[k];
          if (need_grid) {
#pragma unroll
            for (int a = 0; a < D; ++a) sm.dw[(tx * KMax + k) * D + a] = corner_weight_grad(pc, k, a);
          }
        }
      } else {
        sm.valid[tx] = 0u;
      }
    }
    acc_t gsum[4][D];  // points ty, ty+8, ty+16, ty+24 of the tile
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int a = 0; a < D; ++a) gsum[m][a] = acc_t(0);

    for (int64_t cc = c0; cc < c1; cc += 32) {
      __syncthreads();  // corners written / previous gout tile consumed
      // gout tile: rows = 32 channels, columns = 32 points, read along points (coalesced).
      {
        const int64_t q = q0 + tx;
        const int64_t gq = point_base + q;
        const int64_t n = gq / g.P, p = gq % g.P;
        for (int r = ty; r < 32; r += kChannelLanes) {
          const int64_t c = cc + r;
          sm.gtile[r * 33 + tx] =
              (q < q_end && c < c1) ? static_cast<acc_t>(grad_out[(n * g.C + c) * g.P + p]) : acc_t(0);
        }
      }
      __syncthreads();
      const int64_t c = cc + tx;  // this lane's channel
      if (c < c1) {
        acc_t* row = sm.rows + (c - c0) * row_len;
        const scalar_t* trow = table + c * g.S;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const int j = ty + m * kChannelLanes;
          const unsigned valid = sm.valid[j];
          if (valid == 0u) continue;
          const acc_t gv = sm.gtile[tx * 33 + j];
#pragma unroll
          for (int k = 0; k < KMax; ++k) {
            if (k >= K || !(valid >> k & 1u)) continue;
            const int off = sm.offset[j * KMax + k];
            atomicAdd(row + off, sm.weight[j * KMax + k] * gv);
            if (need_grid) {
              const acc_t v = gv * static_cast<acc_t>(trow[off]);
#pragma unroll
              for (int a = 0; a < D; ++a) gsum[m][a] += sm.dw[(j * KMax + k) * D + a] * v;
            }
          }
        }
      }
    }
    if (need_grid) {
      // Sum over the 32 channel lanes of each warp, then one write per point and slice.
      const int64_t total_points = g.N * g.P;
#pragma unroll
      for (int m = 0; m < 4; ++m) {
#pragma unroll
        for (int a = 0; a < D; ++a) {
          acc_t s = gsum[m][a];
#pragma unroll
          for (int w = 16; w > 0; w >>= 1) s += __shfl_xor_sync(0xffffffffu, s, w);
          gsum[m][a] = s;
        }
        const int64_t q = q0 + ty + m * kChannelLanes;
        if (tx == 0 && q < q_end) {
#pragma unroll
          for (int a = 0; a < D; ++a) grid_partial[(slice * total_points + point_base + q) * D + a] = gsum[m][a];
        }
      }
    }
  }
  __syncthreads();
  // Write the slice's gradient out.
  const int64_t width = c1 - c0;
  for (int64_t i = tid; i < width * g.S; i += kThreads) {
    const int64_t cl = i / g.S, s = i % g.S;
    const acc_t v = sm.rows[cl * row_len + s];
    const int64_t e = (b * g.C + c0 + cl) * g.S + s;
    if (grad_input_direct != nullptr) {
      grad_input_direct[e] = static_cast<scalar_t>(v);
    } else if (grad_input_partial != nullptr) {
      grad_input_partial[group * g.N_in * g.C * g.S + e] = v;
    } else {
      atomicAdd(grad_input_accum + e, v);
    }
  }
}

// ---- backward: owner kernel (deterministic, large tables) -------------------------------------

template <typename scalar_t, int D>
__global__ void owner_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grid,
                                      at::opmath_type<scalar_t>* __restrict__ partial, KernelGeometry g,
                                      SampleParams sp, int64_t groups, int64_t points_per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = g.N_in * g.C;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * groups) return;
  const int64_t row = idx % rows, group = idx / rows;
  const int64_t b = row / g.C, c = row % g.C;
  const int64_t npoints = g.N_in == 1 ? g.N * g.P : g.P;
  const int64_t point_base = g.N_in == 1 ? 0 : b * g.P;
  const int64_t q_begin = group * points_per_group;
  const int64_t q_end = q_begin + points_per_group < npoints ? q_begin + points_per_group : npoints;
  const int K = sp.interpolation == kNearest ? 1 : (1 << D);
  acc_t* out = partial + (group * rows + row) * g.S;
  const JitterParams jitter = device_jitter(sp);
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t gq = point_base + q;
    const int64_t n = gq / g.P, p = gq % g.P;
    PointCorners<acc_t, D> pc;
    device_corners<scalar_t, D>(grid, gq, g, sp, jitter, false, pc);
    const acc_t gv = static_cast<acc_t>(grad_out[(n * g.C + c) * g.P + p]);
#pragma unroll
    for (int k = 0; k < (1 << D); ++k) {
      if (k < K && (pc.valid >> k & 1u)) out[pc.offset[k]] += pc.weight[k] * gv;
    }
  }
}

// ---- reductions ------------------------------------------------------------------------------

template <typename scalar_t, int D>
__global__ void reduce_grid_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, int64_t parts,
                                   const scalar_t* __restrict__ grid, scalar_t* __restrict__ grad_grid,
                                   KernelGeometry g, SampleParams sp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total_points = g.N * g.P;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total_points) return;
  const JitterParams jitter = device_jitter(sp);
  PointCorners<acc_t, D> pc;
  device_corners<scalar_t, D>(grid, i, g, sp, jitter, true, pc);
#pragma unroll
  for (int a = 0; a < D; ++a) {
    acc_t s = pc.grad_bias[a];
    for (int64_t j = 0; j < parts; ++j) s += partial[(j * total_points + i) * D + a];
    grad_grid[i * D + (D - 1 - a)] = static_cast<scalar_t>(s * pc.mult[a]);
  }
}

// ---- launchers -------------------------------------------------------------------------------

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

SampleParams sample_params(int64_t interpolation, int64_t padding, bool align_corners, double std, double prob,
                           int64_t mode, const at::Tensor& seed) {
  return SampleParams{static_cast<int>(interpolation), static_cast<int>(padding), align_corners,
                      static_cast<float>(std), static_cast<float>(prob), static_cast<int>(mode),
                      seed.defined() ? seed.data_ptr<int64_t>() : nullptr};
}

at::Tensor seed_tensor(double std, double prob, const c10::optional<at::Tensor>& seed) {
  if (!jitter_requested(std, prob)) return at::Tensor();
  return seed->contiguous();
}

int64_t channel_splits(int64_t point_blocks, int64_t C) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = ceil_div(8 * sms, std::max<int64_t>(point_blocks, 1));
  return std::clamp<int64_t>(want, 1, std::min<int64_t>(ceil_div(C, kChannelLanes), 65535));
}

at::Tensor sample_grid_cuda(const at::Tensor& input_, const at::Tensor& grid_, int64_t interpolation,
                            int64_t padding, bool align_corners, double jitter_std, double jitter_prob,
                            int64_t jitter_mode, const c10::optional<at::Tensor>& jitter_seed) {
  const GridGeometry g = describe_call(input_, grid_);
  check_jitter(jitter_std, jitter_prob, jitter_mode, jitter_seed, input_);
  c10::cuda::CUDAGuard guard(input_.device());
  at::Tensor out = at::empty(g.out_shape, input_.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous();
  const at::Tensor seed = seed_tensor(jitter_std, jitter_prob, jitter_seed);
  const SampleParams sp = sample_params(interpolation, padding, align_corners, jitter_std, jitter_prob, jitter_mode, seed);
  const KernelGeometry kg = kernel_geometry(g);
  const int64_t point_blocks = g.N * ceil_div(g.P, kPointLanes);
  const dim3 blocks(static_cast<unsigned>(point_blocks), static_cast<unsigned>(channel_splits(point_blocks, g.C)));
  const dim3 threads(kPointLanes, kChannelLanes);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sample_grid_cuda", [&] {
    dispatch_dim(g.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      forward_kernel<scalar_t, D><<<blocks, threads, 0, stream>>>(
          input.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), kg, sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_grid_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input_, const at::Tensor& grid_, int64_t interpolation,
    int64_t padding, bool align_corners, double jitter_std, double jitter_prob, int64_t jitter_mode,
    const c10::optional<at::Tensor>& jitter_seed, bool input_requires_grad, bool grid_requires_grad) {
  const GridGeometry g = describe_call(input_, grid_);
  c10::cuda::CUDAGuard guard(input_.device());
  at::Tensor grad_input = input_requires_grad ? at::zeros(input_.sizes(), input_.options()) : at::empty({0}, input_.options());
  at::Tensor grad_grid = grid_requires_grad ? at::zeros(grid_.sizes(), grid_.options()) : at::empty({0}, grid_.options());
  const bool need_grid = grid_requires_grad && interpolation == kBilinear;
  if (g.N * g.C * g.P == 0 || (!input_requires_grad && !need_grid)) return {grad_input, grad_grid};
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous(), gout = grad_output.contiguous();
  const at::Tensor seed = seed_tensor(jitter_std, jitter_prob, jitter_seed);
  const SampleParams sp = sample_params(interpolation, padding, align_corners, jitter_std, jitter_prob, jitter_mode, seed);
  const KernelGeometry kg = kernel_geometry(g);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t total_points = g.N * g.P;
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 threads(kPointLanes, kChannelLanes);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sample_grid_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    dispatch_dim(g.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      at::Tensor grid_partial;
      int64_t grid_parts = 0;

      const int64_t fixed = table_fixed_smem<acc_t, D>();
      const int64_t row_bytes = (g.S + 1) * static_cast<int64_t>(sizeof(acc_t));
      const int64_t max_slice = ((kSmemBudget - fixed) / row_bytes) / 32 * 32;
      if (input_requires_grad && max_slice >= 32 && g.N_in <= 65535) {
        // Table kernel: gradient rows on chip.
        const int64_t slice = std::min<int64_t>(max_slice, ceil_div(g.C, 32) * 32);
        const int64_t slices = ceil_div(g.C, slice);
        const int64_t npoints = g.N_in == 1 ? total_points : g.P;
        const int64_t tiles = ceil_div(npoints, 32);
        int64_t groups = 1;
        if (slices * g.N_in < 2 * sms) groups = std::clamp<int64_t>(ceil_div(8 * sms, slices * g.N_in), 1, std::max<int64_t>(tiles / 4, 1));
        const int64_t per_group = ceil_div(tiles, groups) * 32;
        groups = ceil_div(npoints, per_group);
        at::Tensor accum, partial;
        scalar_t* direct = nullptr;
        acc_t* accum_ptr = nullptr;
        acc_t* partial_ptr = nullptr;
        if (groups == 1) {
          direct = grad_input.data_ptr<scalar_t>();
        } else if (deterministic) {
          partial = at::empty({groups, g.N_in, g.C, g.S}, acc_opts);
          partial_ptr = partial.data_ptr<acc_t>();
        } else {
          accum = std::is_same<scalar_t, acc_t>::value ? grad_input : at::zeros(input.sizes(), acc_opts);
          accum_ptr = accum.data_ptr<acc_t>();
        }
        if (need_grid) {
          grid_parts = slices;
          grid_partial = at::empty({slices, total_points, D}, acc_opts);
        }
        const int64_t smem = fixed + slice * row_bytes;
        const dim3 blocks(static_cast<unsigned>(groups), static_cast<unsigned>(slices), static_cast<unsigned>(g.N_in));
        table_backward_kernel<scalar_t, D><<<blocks, threads, smem, stream>>>(
            gout.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(), direct, accum_ptr,
            partial_ptr, need_grid ? grid_partial.data_ptr<acc_t>() : nullptr, kg, sp, slice, per_group);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (partial.defined()) grad_input.copy_(partial.sum(0));
        else if (accum.defined() && !accum.is_same(grad_input)) grad_input.copy_(accum);
      } else {
        const int64_t point_blocks = g.N * ceil_div(g.P, kPointLanes);
        const int64_t splits = channel_splits(point_blocks, g.C);
        const bool scatter_input = input_requires_grad && !deterministic;
        at::Tensor accum;
        if (scatter_input) accum = std::is_same<scalar_t, acc_t>::value ? grad_input : at::zeros(input.sizes(), acc_opts);
        if (need_grid) {
          grid_parts = splits;
          grid_partial = at::empty({splits, total_points, D}, acc_opts);
        }
        if (scatter_input || need_grid) {
          const dim3 blocks(static_cast<unsigned>(point_blocks), static_cast<unsigned>(splits));
          scatter_backward_kernel<scalar_t, D><<<blocks, threads, 0, stream>>>(
              gout.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(),
              scatter_input ? accum.data_ptr<acc_t>() : nullptr, need_grid ? grid_partial.data_ptr<acc_t>() : nullptr,
              kg, sp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (scatter_input && !accum.is_same(grad_input)) grad_input.copy_(accum);
        if (input_requires_grad && deterministic) {
          // Rows of the gradient owned by threads, point groups summed in a fixed order.
          const int64_t rows = g.N_in * g.C;
          const int64_t npoints = g.N_in == 1 ? total_points : g.P;
          const int64_t budget = std::max<int64_t>(1, (int64_t(256) << 20) / std::max<int64_t>(1, rows * g.S * int64_t(sizeof(acc_t))));
          const int64_t groups = std::clamp<int64_t>(ceil_div(int64_t(64) * 1024, rows), 1, std::min(budget, npoints));
          const int64_t per_group = ceil_div(npoints, groups);
          at::Tensor partial = at::zeros({groups, g.N_in, g.C, g.S}, acc_opts);
          const int64_t work = rows * groups;
          owner_backward_kernel<scalar_t, D><<<static_cast<unsigned>(ceil_div(work, 128)), 128, 0, stream>>>(
              gout.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), kg, sp, groups, per_group);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          grad_input.copy_(partial.sum(0));
        }
      }
      if (need_grid) {
        reduce_grid_kernel<scalar_t, D><<<static_cast<unsigned>(ceil_div(total_points, 256)), 256, 0, stream>>>(
            grid_partial.data_ptr<acc_t>(), grid_parts, grid.data_ptr<scalar_t>(), grad_grid.data_ptr<scalar_t>(), kg, sp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {grad_input, grad_grid};
}

__global__ void jitter_noise_kernel(const int64_t* __restrict__ seed, int64_t num_points, int dim, float std,
                                    float prob, int mode, float* __restrict__ noise, bool* __restrict__ flags) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= num_points) return;
  const JitterParams j = make_jitter(std, prob, mode, seed[0], seed[1]);
  float v[4];
  flags[i] = jitter_point(j, i, v);
  for (int k = 0; k < dim; ++k) noise[i * dim + k] = v[k];
}

std::tuple<at::Tensor, at::Tensor> jitter_noise_cuda(const at::Tensor& seed_, int64_t num_points, int64_t dim,
                                                     double std, double prob, int64_t mode) {
  TORCH_CHECK(num_points >= 0, "jitter_noise: num_points must be >= 0, got ", num_points);
  TORCH_CHECK(dim >= 1 && dim <= kMaxDim, "jitter_noise: dim must be 1 to 4, got ", dim);
  TORCH_CHECK(seed_.scalar_type() == at::kLong && seed_.numel() == 2,
              "jitter_noise: jitter_seed must be an int64 tensor of 2 elements [seed, offset]");
  c10::cuda::CUDAGuard guard(seed_.device());
  const at::Tensor seed = seed_.contiguous();
  at::Tensor noise = at::zeros({num_points, dim}, seed.options().dtype(at::kFloat));
  at::Tensor flags = at::zeros({num_points}, seed.options().dtype(at::kBool));
  if (num_points == 0) return {noise, flags};
  jitter_noise_kernel<<<static_cast<unsigned>(ceil_div(num_points, 256)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      seed.data_ptr<int64_t>(), num_points, static_cast<int>(dim), static_cast<float>(std), static_cast<float>(prob),
      static_cast<int>(mode), noise.data_ptr<float>(), flags.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {noise, flags};
}

}  // namespace

TORCH_LIBRARY_IMPL(grad_ext, CUDA, m) {
  m.impl("sample_grid", &sample_grid_cuda);
  m.impl("sample_grid_backward", &sample_grid_backward_cuda);
  m.impl("jitter_noise", &jitter_noise_cuda);
}

}  // namespace grad_ext
