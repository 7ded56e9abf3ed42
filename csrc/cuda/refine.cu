// CUDA kernels of refine. A block of (kPixelsPerBlock, kChannelLanes) threads owns
// kPixelsPerBlock consecutive pixels of the flattened (B, H, W): threadIdx.x picks the pixel,
// so a warp reads 32 consecutive addresses of one channel plane (coalesced), and threadIdx.y
// strides over the channels. The lanes' partial sums are combined in shared memory in a fixed
// order. The loss is summed per block into its own slot and the slots are added by one block
// in a fixed order, so the result is bitwise reproducible (no float atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <climits>

#include "cuda/runtime.h"
#include "refine.h"
#include "refine_common.h"

namespace grad_ext {
namespace {

using cuda::current_stream;
using cuda::launch;
using cuda::Stream;

constexpr int kPixelsPerBlock = 32;  // one warp along the pixels
constexpr int kChannelLanes = 8;     // warps of a block, each taking every 8th channel
constexpr int kBlockThreads = kPixelsPerBlock * kChannelLanes;
constexpr int kReduceThreads = 256;

struct PixelIndex {
  bool active;   // false for the padding threads of the last block
  int64_t p;     // pixel index in the flattened (B, H, W)
  int64_t base;  // offset of the pixel's channel 0 in (B, C, H, W)
};

__device__ __forceinline__ PixelIndex pixel_index(int64_t C, int64_t HW, int64_t P) {
  PixelIndex idx;
  idx.p = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock + threadIdx.x;
  idx.active = idx.p < P;
  const int64_t b = idx.active ? idx.p / HW : 0;
  idx.base = idx.active ? b * C * HW + (idx.p - b * HW) : 0;
  return idx;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    refine_forward_kernel(const scalar_t* __restrict__ rec, const scalar_t* __restrict__ feat, int64_t C, int64_t HW,
                          int64_t P, at::opmath_type<scalar_t> mse_weight, at::opmath_type<scalar_t> cos_weight,
                          at::opmath_type<scalar_t> threshold, scalar_t* __restrict__ sim_out,
                          scalar_t* __restrict__ map_out, at::opmath_type<scalar_t>* __restrict__ stats,
                          at::opmath_type<scalar_t>* __restrict__ loss_partials, scalar_t* __restrict__ refined) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ PixelSums<acc_t> lane_sums[kChannelLanes][kPixelsPerBlock];
  __shared__ acc_t pixel_sim[kPixelsPerBlock];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const PixelIndex idx = pixel_index(C, HW, P);

  PixelSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  if (idx.active) {
#pragma unroll 4
    for (int64_t c = ty; c < C; c += kChannelLanes) {
      const int64_t off = idx.base + c * HW;
      accumulate(sums, static_cast<acc_t>(rec[off]), static_cast<acc_t>(feat[off]));
    }
  }
  lane_sums[ty][tx] = sums;
  __syncthreads();

  if (ty == 0) {  // warp 0: one thread per pixel
    acc_t loss = acc_t(0);
    if (idx.active) {
      PixelSums<acc_t> s = lane_sums[0][tx];
      for (int lane = 1; lane < kChannelLanes; ++lane) add(s, lane_sums[lane][tx]);
      const acc_t indicator = mse_indicator(s, C, threshold);
      const PixelForward<acc_t> out = refine_pixel(s, indicator, mse_weight, cos_weight);
      sim_out[idx.p] = static_cast<scalar_t>(out.sim);
      map_out[idx.p] = static_cast<scalar_t>(out.map);
      stats[kSumSqDiff * P + idx.p] = s.sq_diff;
      stats[kSumSqRec * P + idx.p] = s.sq_rec;
      stats[kSumSqFeat * P + idx.p] = s.sq_feat;
      stats[kSumRecFeat * P + idx.p] = s.rec_feat;
      stats[kIndicator * P + idx.p] = indicator;
      pixel_sim[tx] = out.sim;
      loss = out.loss_term;
    }
    for (int offset = kPixelsPerBlock / 2; offset > 0; offset >>= 1) {
      loss += __shfl_down_sync(0xffffffffu, loss, offset);
    }
    if (tx == 0) loss_partials[blockIdx.x] = loss;
  }

  if (refined == nullptr) return;  // the same for every thread of the block
  __syncthreads();
  if (!idx.active) return;
  const acc_t sim = pixel_sim[tx];
#pragma unroll 4
  for (int64_t c = ty; c < C; c += kChannelLanes) {
    const int64_t off = idx.base + c * HW;
    refined[off] =
        static_cast<scalar_t>(refined_value(sim, static_cast<acc_t>(rec[off]), static_cast<acc_t>(feat[off])));
  }
}

// One block adds the per-block loss partials in a fixed order and divides by B*C*H*W.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    sum_loss_kernel(const at::opmath_type<scalar_t>* __restrict__ partials, int64_t count, double numel,
                    scalar_t* __restrict__ loss) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double buffer[kReduceThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) s += static_cast<double>(partials[i]);
  buffer[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) buffer[threadIdx.x] += buffer[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<scalar_t>(static_cast<acc_t>(buffer[0] / numel));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    refine_backward_kernel(const scalar_t* __restrict__ grad_sim, const scalar_t* __restrict__ grad_map,
                           const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ grad_refined,
                           const scalar_t* __restrict__ rec, const scalar_t* __restrict__ feat,
                           const at::opmath_type<scalar_t>* __restrict__ stats, int64_t C, int64_t HW, int64_t P,
                           at::opmath_type<scalar_t> mse_weight, at::opmath_type<scalar_t> cos_weight,
                           at::opmath_type<scalar_t> numel, scalar_t* __restrict__ grad_rec,
                           scalar_t* __restrict__ grad_feat) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t lane_dot[kChannelLanes][kPixelsPerBlock];
  __shared__ PixelGrad<acc_t> pixel_grad[kPixelsPerBlock];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const PixelIndex idx = pixel_index(C, HW, P);

  // sum_c grad_refined * (rec - feat): the only upstream term that needs a channel reduction.
  if (grad_refined != nullptr) {  // the same for every thread of the block
    acc_t dot = acc_t(0);
    if (idx.active) {
#pragma unroll 4
      for (int64_t c = ty; c < C; c += kChannelLanes) {
        const int64_t off = idx.base + c * HW;
        dot += static_cast<acc_t>(grad_refined[off]) * (static_cast<acc_t>(rec[off]) - static_cast<acc_t>(feat[off]));
      }
    }
    lane_dot[ty][tx] = dot;
    __syncthreads();
  }

  if (ty == 0 && idx.active) {
    acc_t dot = acc_t(0);
    if (grad_refined != nullptr) {
      for (int lane = 0; lane < kChannelLanes; ++lane) dot += lane_dot[lane][tx];
    }
    const int64_t p = idx.p;
    const PixelSums<acc_t> s{stats[kSumSqDiff * P + p], stats[kSumSqRec * P + p], stats[kSumSqFeat * P + p],
                             stats[kSumRecFeat * P + p]};
    const acc_t g_loss = grad_loss != nullptr ? static_cast<acc_t>(*grad_loss) / numel : acc_t(0);
    pixel_grad[tx] = refine_pixel_grad(s, stats[kIndicator * P + p], mse_weight, cos_weight,
                                       grad_sim != nullptr ? static_cast<acc_t>(grad_sim[p]) : acc_t(0),
                                       grad_map != nullptr ? static_cast<acc_t>(grad_map[p]) : acc_t(0), g_loss, dot);
  }
  __syncthreads();
  if (!idx.active) return;

  const PixelGrad<acc_t> g = pixel_grad[tx];
#pragma unroll 4
  for (int64_t c = ty; c < C; c += kChannelLanes) {
    const int64_t off = idx.base + c * HW;
    const acc_t r = static_cast<acc_t>(rec[off]), f = static_cast<acc_t>(feat[off]);
    const acc_t gref = grad_refined != nullptr ? static_cast<acc_t>(grad_refined[off]) : acc_t(0);
    if (grad_rec != nullptr) grad_rec[off] = static_cast<scalar_t>(grad_rec_value(g, r, f, gref));
    if (grad_feat != nullptr) grad_feat[off] = static_cast<scalar_t>(grad_feat_value(g, r, f, gref));
  }
}

int64_t block_count(const RefineGeometry& g) {
  const int64_t blocks = (g.P + kPixelsPerBlock - 1) / kPixelsPerBlock;
  TORCH_CHECK(blocks <= INT_MAX, "refine: too many pixels for one launch (", g.P, ")");
  return blocks;
}

template <typename scalar_t>
const scalar_t* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> refine_cuda(const at::Tensor& rec_,
                                                                                   const at::Tensor& feat_,
                                                                                   double mse_weight, double cos_weight,
                                                                                   double mse_threshold,
                                                                                   bool return_refined) {
  const RefineGeometry g = describe_refine(rec_, feat_, Backend::kCuda);
  check_refine_params(mse_weight, cos_weight, mse_threshold);
  const cuda::DeviceGuard guard(rec_.device());
  auto outputs = allocate_refine_outputs(rec_, g, return_refined);
  at::Tensor sim = std::get<0>(outputs), map = std::get<1>(outputs), loss = std::get<2>(outputs),
             refined = std::get<3>(outputs), stats = std::get<4>(outputs);
  const at::Tensor rec = rec_.contiguous(), feat = feat_.contiguous();
  const int64_t blocks = block_count(g);
  at::Tensor partials = at::empty({blocks}, stats.options());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rec.scalar_type(), "refine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch<refine_forward_kernel<scalar_t>>(
        dim3(static_cast<unsigned>(blocks)), dim3(kPixelsPerBlock, kChannelLanes), 0, stream, rec.data_ptr<scalar_t>(),
        feat.data_ptr<scalar_t>(), g.C, g.HW, g.P, static_cast<acc_t>(mse_weight), static_cast<acc_t>(cos_weight),
        static_cast<acc_t>(mse_threshold), sim.data_ptr<scalar_t>(), map.data_ptr<scalar_t>(), stats.data_ptr<acc_t>(),
        partials.data_ptr<acc_t>(), return_refined ? refined.data_ptr<scalar_t>() : nullptr);
    launch<sum_loss_kernel<scalar_t>>(dim3(1), dim3(kReduceThreads), 0, stream, partials.data_ptr<acc_t>(), blocks,
                                      static_cast<double>(g.numel()), loss.data_ptr<scalar_t>());
  });
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> refine_backward_cuda(const c10::optional<at::Tensor>& grad_sim,
                                                        const c10::optional<at::Tensor>& grad_map,
                                                        const c10::optional<at::Tensor>& grad_loss,
                                                        const c10::optional<at::Tensor>& grad_refined,
                                                        const at::Tensor& rec_, const at::Tensor& feat_,
                                                        const at::Tensor& stats_, double mse_weight, double cos_weight,
                                                        bool rec_requires_grad, bool feat_requires_grad) {
  const RefineGeometry g = describe_refine(rec_, feat_, Backend::kCuda);
  check_refine_weights(mse_weight, cos_weight);
  const cuda::DeviceGuard guard(rec_.device());
  const RefineUpstream up = check_refine_backward(grad_sim, grad_map, grad_loss, grad_refined, rec_, stats_, g);
  at::Tensor grad_rec = allocate_refine_grad(rec_, rec_requires_grad);
  at::Tensor grad_feat = allocate_refine_grad(feat_, feat_requires_grad);
  if (!rec_requires_grad && !feat_requires_grad) return {grad_rec, grad_feat};
  const at::Tensor rec = rec_.contiguous(), feat = feat_.contiguous(), stats = stats_.contiguous();
  const int64_t blocks = block_count(g);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rec.scalar_type(), "refine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch<refine_backward_kernel<scalar_t>>(
        dim3(static_cast<unsigned>(blocks)), dim3(kPixelsPerBlock, kChannelLanes), 0, stream,
        optional_ptr<scalar_t>(up.sim), optional_ptr<scalar_t>(up.map), optional_ptr<scalar_t>(up.loss),
        optional_ptr<scalar_t>(up.refined), rec.data_ptr<scalar_t>(), feat.data_ptr<scalar_t>(),
        stats.data_ptr<acc_t>(), g.C, g.HW, g.P, static_cast<acc_t>(mse_weight), static_cast<acc_t>(cos_weight),
        static_cast<acc_t>(g.numel()), rec_requires_grad ? grad_rec.data_ptr<scalar_t>() : nullptr,
        feat_requires_grad ? grad_feat.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_rec, grad_feat};
}

}  // namespace

TORCH_LIBRARY_IMPL(GRAD_EXT_CUDA_OPS, GRAD_EXT_CUDA_KEY, m) {
  m.impl("refine", &refine_cuda);
  m.impl("refine_backward", &refine_backward_cuda);
}

}  // namespace grad_ext
