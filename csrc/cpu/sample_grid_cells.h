#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu/sample_grid_rows.h"
#include "cpu/simd.h"
#include "cpu/transpose.h"
#include "sample_grid.h"

namespace grad_ext {
namespace cpu {

// ---- Cell-major loops (small tables, and large ones read by many corners) --------------------
// With a copy of the table in (cell, channel) layout, a point's corner rows are contiguous
// runs of channels, so the channel loop runs kLanes channels at a time in SIMD registers.
// Outputs (and output gradients) are (channel, point) rows; they go through a small
// point-major scratch block that is transposed on the way out (in). The loops are written
// once with GCC/Clang vector types and compiled twice on x86: for the baseline ISA and for
// AVX2+FMA, picked at run time.
constexpr int64_t kCellBlock = 64;                       // channels per scratch block (a multiple of kLanes)
constexpr int64_t kScratchStride = kCellBlock + kLanes;  // not a power of two: spreads the rows over cache sets

// Channel rows <-> cell-major blocks, in blocks of kTransposeCells cells so that both sides
// are read and written in whole cache lines.
constexpr int64_t kTransposeCells = 64;
constexpr int64_t kToCellsBlock = 2048;
constexpr int64_t kTransposeParallelElems = int64_t(1) << 20;

// dst[s * width + c] = src[c * src_stride + s] for s < cells and c < channels, and 0 for the
// padding channels channels <= c < width.
template <typename T>
GRAD_EXT_INLINE void to_cells_impl(const T* src, int64_t src_stride, int64_t channels, int64_t cells, T* dst,
                                   int64_t width) {
  for (int64_t s0 = 0; s0 < cells; s0 += kToCellsBlock) {
    const int64_t n = std::min(kToCellsBlock, cells - s0);
    transpose_block<false>(src + s0, src_stride, dst + s0 * width, width, channels, n);
    if (channels < width)
      for (int64_t s = s0; s < s0 + n; ++s) std::fill(dst + s * width + channels, dst + (s + 1) * width, T(0));
  }
}

// dst[c * dst_stride + s] = (or +=, when ADD) src[s * width + c] for c < channels and s < cells.
template <bool ADD, typename T>
GRAD_EXT_INLINE void from_cells_impl(const T* src, int64_t width, int64_t channels, int64_t cells, T* dst,
                                     int64_t dst_stride) {
  for (int64_t s0 = 0; s0 < cells; s0 += kTransposeCells)
    transpose_block<ADD>(src + s0 * width, width, dst + s0, dst_stride, std::min(kTransposeCells, cells - s0),
                         channels);
}

template <typename T>
void to_cells_base(const T* src, int64_t src_stride, int64_t channels, int64_t cells, T* dst, int64_t width) {
  to_cells_impl(src, src_stride, channels, cells, dst, width);
}
template <bool ADD, typename T>
void from_cells_base(const T* src, int64_t width, int64_t channels, int64_t cells, T* dst, int64_t dst_stride) {
  from_cells_impl<ADD>(src, width, channels, cells, dst, dst_stride);
}
#ifdef GRAD_EXT_AVX2_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void to_cells_avx2(const T* src, int64_t src_stride, int64_t channels,
                                                       int64_t cells, T* dst, int64_t width) {
  to_cells_impl(src, src_stride, channels, cells, dst, width);
}
template <bool ADD, typename T>
__attribute__((target("avx2,fma"))) void from_cells_avx2(const T* src, int64_t width, int64_t channels, int64_t cells,
                                                         T* dst, int64_t dst_stride) {
  from_cells_impl<ADD>(src, width, channels, cells, dst, dst_stride);
}
#endif

template <typename T>
void to_cells(const T* src, int64_t src_stride, int64_t channels, int64_t cells, T* dst, int64_t width) {
#ifdef GRAD_EXT_AVX2_DISPATCH
  if (cpu_has_avx2()) return to_cells_avx2(src, src_stride, channels, cells, dst, width);
#endif
  to_cells_base(src, src_stride, channels, cells, dst, width);
}
template <bool ADD, typename T>
void from_cells(const T* src, int64_t width, int64_t channels, int64_t cells, T* dst, int64_t dst_stride) {
#ifdef GRAD_EXT_AVX2_DISPATCH
  if (cpu_has_avx2()) return from_cells_avx2<ADD>(src, width, channels, cells, dst, dst_stride);
#endif
  from_cells_base<ADD>(src, width, channels, cells, dst, dst_stride);
}

// A task's channels rows[c * S + s], c < channels, -> dst (S + 1, width): cell-major, padding
// channels and the zero row S (see cell_major) set to 0.
template <typename T>
void channel_cells(const T* rows, int64_t channels, int64_t S, T* dst, int64_t width) {
  to_cells(rows, S, channels, S, dst, width);
  std::fill(dst + S * width, dst + (S + 1) * width, T(0));
}

// (N_in, C, S) input -> (N_in, S + 1, Cp) with Cp = C rounded up to kLanes, padded with zeros.
// Row S is all zeros: invalid corners (weight 0) point there, so they add exact zeros even
// when the table holds inf or NaN. (The backward pass makes a copy of each task's channels
// instead, see backward_kernel.)
inline at::Tensor cell_major(const at::Tensor& input, const GridGeometry& g) {
  const int64_t Cp = round_up(g.C, kLanes);
  at::Tensor t = at::empty({g.N_in, g.S + 1, Cp}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "cell_major", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* out = t.data_ptr<scalar_t>();
    const int64_t cell_blocks = ceil_div(g.S, kTransposeCells);
    // in parallel only when it is large: a parallel region costs more than a small copy
    const int64_t grain = std::max<int64_t>(1, kTransposeParallelElems / (kTransposeCells * Cp));
    at::parallel_for(0, g.N_in * cell_blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / cell_blocks, s0 = (task % cell_blocks) * kTransposeCells;
        to_cells(in + n * g.C * g.S + s0, g.S, g.C, std::min(kTransposeCells, g.S - s0),
                 out + (n * (g.S + 1) + s0) * Cp, Cp);
      }
    });
    for (int64_t n = 0; n < g.N_in; ++n)
      std::fill(out + (n * (g.S + 1) + g.S) * Cp, out + (n * (g.S + 1) + g.S + 1) * Cp, scalar_t(0));
  });
  return t;
}

// The arguments of both cell-major loops; `cells` is a (S + 1, Cp) cell-major copy of this
// table batch's channels from cells_c0 on.
template <typename T, int TAPS, int D>
struct CellsCall {
  const CornerTile<T, TAPS, D>* tile;
  const T* cells;
  int64_t cells_c0;
  int64_t Cp;
  int64_t zero_cell;  // S: the zero row of `cells` (and a discarded row of gradT)
  int64_t c_begin, c_end, P;
  T* scratch;  // kPointTile x kScratchStride
  // forward
  T* out;
  // backward: gradT is the task's (S + 1, Wt) input gradient in cell-major layout from channel
  // c_begin; gacc[a * kPointTile + i] the grid gradient of point i
  const T* gout;
  T* gradT;
  int64_t Wt;
  T* gacc;
  // forward: write `out` with streaming stores (see streams_output)
  bool stream = false;
};

// Outputs this large are written with streaming stores where the CPU build allows it (float,
// AVX2 build, 32-byte aligned rows) and the output's pages are already mapped: such an output
// does not stay in cache for its reader anyway, and an ordinary store first reads each line it
// writes, doubling the memory traffic of a loop that is bound by it. Into fresh pages (a new
// mapping: glibc's malloc as it comes, for 32 MiB and more) streaming is slower, not faster:
// the page fault clears each page through the cache, and the streaming stores then have to
// evict those lines again (local grid B=64 forward on the 2-core AMD VM: 18-19 ms streamed
// against 15-16 ms not).
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;

// Whether the pages of [p, p + bytes) are mapped (sampled at the first, middle and last byte).
inline bool pages_mapped(const void* p, int64_t bytes) {
#if defined(__linux__)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), size = static_cast<uintptr_t>(bytes);
  for (const uintptr_t at : {begin, begin + size / 2, begin + size - 1}) {
    unsigned char resident = 0;
    if (mincore(reinterpret_cast<void*>(at & ~(page - 1)), 1, &resident) != 0 || !(resident & 1u)) return false;
  }
  return true;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

template <typename T>
inline bool streams_output(const T* out, int64_t P, int64_t bytes) {
  return std::is_same<T, float>::value && bytes >= kStreamMinBytes && P % kLanes == 0 &&
         reinterpret_cast<uintptr_t>(out) % (kLanes * sizeof(T)) == 0 && pages_mapped(out, bytes);
}

// The (channel, point) rows of outputs and output gradients are read and written a tile (512
// bytes of floats) at a time in kCellBlock rows at once: more streams than the hardware
// prefetcher follows, so each row's next tile is prefetched by hand (for writing, when
// WRITE). Prefetches past the end of the data are harmless.
template <bool WRITE, typename T>
GRAD_EXT_INLINE void prefetch_next_tile(const T* row) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < kPointTile; i += kLine) __builtin_prefetch(row + kPointTile + i, WRITE ? 1 : 0, 1);
}

template <typename T, int TAPS, int D>
GRAD_EXT_INLINE int64_t corner_cell(const CellsCall<T, TAPS, D>& a, int k, int64_t i) {
  return (a.tile->valid[i] >> k & 1u) ? a.tile->off[k][i] : a.zero_cell;
}

template <typename T, int TAPS, int D, bool STREAM>
GRAD_EXT_INLINE void forward_cells_impl(const CellsCall<T, TAPS, D>& a) {
  using V = simd_t<T>;
  constexpr int K = CornerTile<T, TAPS, D>::K;
  const CornerTile<T, TAPS, D>& t = *a.tile;
  for (int64_t b0 = a.c_begin; b0 < a.c_end; b0 += kCellBlock) {
    const int64_t b1 = std::min(a.c_end, b0 + kCellBlock), width = round_up(b1 - b0, kLanes);
    for (int64_t i = 0; i < t.count; ++i) {
      const T* rows[K];
      for (int k = 0; k < K; ++k) rows[k] = a.cells + corner_cell(a, k, i) * a.Cp + (b0 - a.cells_c0);
      T* o = a.scratch + i * kScratchStride;
      V weight[K];  // in registers (see backward_cells_impl)
      for (int k = 0; k < K; ++k) weight[k] = V{} + t.w[k][i];
      for (int64_t c = 0; c < width; c += kLanes) {
        V acc = load_lanes(rows[0] + c) * weight[0];
        for (int k = 1; k < K; ++k) acc += load_lanes(rows[k] + c) * weight[k];
        store_lanes(o + c, acc);
      }
    }
    transpose_block<false, T, STREAM>(a.scratch, kScratchStride, a.out + b0 * a.P, a.P, t.count, b1 - b0);
    if (!STREAM) {  // a streamed output is not read into the cache, so it is not prefetched either
      for (int64_t c = b0; c < b1; ++c) prefetch_next_tile<true>(a.out + c * a.P);
    }
  }
  if (STREAM) stream_fence();
}

template <typename T, int TAPS, int D, bool NEED_INPUT, bool NEED_GRID>
GRAD_EXT_INLINE void backward_cells_impl(const CellsCall<T, TAPS, D>& a) {
  using V = simd_t<T>;
  constexpr int K = CornerTile<T, TAPS, D>::K;
  const CornerTile<T, TAPS, D>& t = *a.tile;
  for (int64_t b0 = a.c_begin; b0 < a.c_end; b0 += kCellBlock) {
    const int64_t b1 = std::min(a.c_end, b0 + kCellBlock), width = round_up(b1 - b0, kLanes);
    transpose_block<false>(a.gout + b0 * a.P, a.P, a.scratch, kScratchStride, b1 - b0, t.count);
    for (int64_t c = b0; c < b1; ++c) prefetch_next_tile<false>(a.gout + c * a.P);
    if (b1 - b0 < width) {  // padding lanes must be 0, not stale values: they meet the table's zero padding
      for (int64_t i = 0; i < t.count; ++i)
        std::fill(a.scratch + i * kScratchStride + (b1 - b0), a.scratch + i * kScratchStride + width, T(0));
    }
    for (int64_t i = 0; i < t.count; ++i) {
      if (t.valid[i] == 0u) continue;  // entirely outside: contributes nothing (even for a NaN gradient)
      const T* rows[K];
      T* grows[K];
      for (int k = 0; k < K; ++k) {
        const int64_t cell = corner_cell(a, k, i);
        rows[k] = a.cells + cell * a.Cp + (b0 - a.cells_c0);
        grows[k] = a.gradT + cell * a.Wt + (b0 - a.c_begin);
      }
      const T* gv = a.scratch + i * kScratchStride;
      // The weights in registers: read from t.w inside the loop, they are loaded again after
      // every store to the gradient (the compiler cannot rule out that the two overlap).
      V weight[K];
      for (int k = 0; k < K; ++k) weight[k] = V{} + t.w[k][i];
      V sum[K] = {};
      for (int64_t c = 0; c < width; c += kLanes) {
        const V g = load_lanes(gv + c);
        for (int k = 0; k < K; ++k) {
          if (NEED_GRID) sum[k] += g * load_lanes(rows[k] + c);
          if (NEED_INPUT) store_lanes(grows[k] + c, load_lanes(grows[k] + c) + g * weight[k]);
        }
      }
      if (NEED_GRID) {
        T corner[K];
        for (int k = 0; k < K; ++k) corner[k] = sum_lanes<T>(sum[k]);
        for (int d = 0; d < D; ++d) {
          T ga = T(0);
          for (int k = 0; k < K; ++k) ga += t.dw[k][d][i] * corner[k];
          a.gacc[d * kPointTile + i] += ga;
        }
      }
    }
  }
}

template <typename T, int TAPS, int D>
void forward_cells_base(const CellsCall<T, TAPS, D>& a) {
  forward_cells_impl<T, TAPS, D, false>(a);
}
template <typename T, int TAPS, int D, bool NEED_INPUT, bool NEED_GRID>
void backward_cells_base(const CellsCall<T, TAPS, D>& a) {
  backward_cells_impl<T, TAPS, D, NEED_INPUT, NEED_GRID>(a);
}

#ifdef GRAD_EXT_AVX2_DISPATCH
template <typename T, int TAPS, int D>
__attribute__((target("avx2,fma"))) void forward_cells_avx2(const CellsCall<T, TAPS, D>& a) {
  if constexpr (std::is_same<T, float>::value) {
    if (a.stream) return forward_cells_impl<T, TAPS, D, true>(a);
  }
  forward_cells_impl<T, TAPS, D, false>(a);
}
template <typename T, int TAPS, int D, bool NEED_INPUT, bool NEED_GRID>
__attribute__((target("avx2,fma"))) void backward_cells_avx2(const CellsCall<T, TAPS, D>& a) {
  backward_cells_impl<T, TAPS, D, NEED_INPUT, NEED_GRID>(a);
}
#endif

template <typename T, int TAPS, int D>
void forward_cells(const CellsCall<T, TAPS, D>& a) {
#ifdef GRAD_EXT_AVX2_DISPATCH
  if (cpu_has_avx2()) return forward_cells_avx2(a);
#endif
  forward_cells_base(a);
}

template <typename T, int TAPS, int D, bool NEED_INPUT, bool NEED_GRID>
void backward_cells(const CellsCall<T, TAPS, D>& a) {
#ifdef GRAD_EXT_AVX2_DISPATCH
  if (cpu_has_avx2()) return backward_cells_avx2<T, TAPS, D, NEED_INPUT, NEED_GRID>(a);
#endif
  backward_cells_base<T, TAPS, D, NEED_INPUT, NEED_GRID>(a);
}

// When the cell-major loops are used: they pay one transposed copy of the table (in the
// backward pass a private copy of each task's channels and a private (cell, channel) gradient
// block), which is repaid when the task's table rows fit in cache, or when each cell is read
// by many corners (the copy is one streaming pass; the gathers and scatters it speeds up are K
// per point). The thresholds were measured on the benchmark's drop-in shapes: a shared copy of
// a large table for the 2-D forward (4 reads per cell) is slower than the row loops, the
// backward (4 and more) and the 3-D and 4-D forward (8 and more) are faster cell-major. The
// forward pass of per-image tables decides by use_local_cells below.
constexpr int64_t kCellsInCacheBytes = 64 * 1024;
constexpr int64_t kCellsForwardReadsPerCell = 8;
constexpr int64_t kCellsBackwardReadsPerCell = 4;
constexpr int64_t kCellsMaxPrivateBytes = 16 << 20;

// private_elem: bytes per element of the backward pass's private blocks (table copy and
// gradient), 0 forward.
inline bool use_cells(const GridGeometry& g, int K, int64_t channel_tile, int64_t elem, int64_t reads_per_cell,
                      int64_t private_elem) {
  if ((g.S + 1) * round_up(channel_tile, kLanes) * private_elem > kCellsMaxPrivateBytes) return false;
  if (channel_tile * g.S * elem <= kCellsInCacheBytes) return true;
  return g.N * g.P * K >= reads_per_cell * g.N_in * g.S;
}

// The forward pass over per-image tables copies each task's channels (forward_local_cells):
// worth it when the copy stays in cache and every cell is read by enough corners.
constexpr int64_t kCellsLocalReadsPerCell = 4;
constexpr int64_t kCellsLocalMaxBytes = 2 << 20;

inline bool use_local_cells(const GridGeometry& g, int K, int64_t channel_tile, int64_t elem) {
  if ((g.S + 1) * channel_tile * elem > kCellsLocalMaxBytes) return false;
  return g.P * K >= kCellsLocalReadsPerCell * g.S;
}

}  // namespace cpu
}  // namespace grad_ext
