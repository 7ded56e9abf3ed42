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
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "grid_common.h"
#include "huge_pages.h"
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

// Corners of a tile of points in structure-of-arrays form, so the per-channel loops below
// run over points with compile-time corner counts. Invalid corners get weight 0 and offset 0;
// a tile where any point has an invalid corner (or a non-finite bias) takes the checked path.
template <typename acc_t, int K, int D>
struct CornerTile {
  int64_t off[K][kPointTile];
  acc_t w[K][kPointTile];
  acc_t dw[K][D][kPointTile];
  unsigned valid[kPointTile];
  acc_t bias[kPointTile];
  int64_t count = 0;
  bool checked = false;  // some point has an invalid corner or a non-zero bias
  bool biased = false;   // some point has a non-zero (non-finite) bias

  template <typename scalar_t>
  void fill(const scalar_t* grid, int64_t first_point, int64_t count_, const GridGeometry& g, int interpolation,
            int padding, bool align_corners, const JitterParams& jitter, bool with_grad) {
    count = count_;
    checked = false;
    biased = false;
    const NonFinitePolicy policy = cpu_policy(D);
    PointCorners<acc_t, D> pc;
    for (int64_t i = 0; i < count; ++i) {
      point_corners<scalar_t, D>(grid, first_point + i, g, interpolation, padding, align_corners, policy, jitter,
                                 with_grad, pc);
      valid[i] = pc.valid;
      bias[i] = pc.bias;
      if (pc.valid != (1u << K) - 1u || pc.bias != acc_t(0)) checked = true;
      if (pc.bias != acc_t(0)) biased = true;
      for (int k = 0; k < K; ++k) {
        const bool ok = pc.valid >> k & 1u;
        off[k][i] = ok ? pc.offset[k] : 0;
        w[k][i] = ok ? pc.weight[k] : acc_t(0);
        if (with_grad)
          for (int a = 0; a < D; ++a) dw[k][a][i] = ok ? corner_weight_grad(pc, k, a) : acc_t(0);
      }
    }
  }
};

template <typename scalar_t, typename acc_t, int K, int D, bool CHECKED>
void forward_rows(const CornerTile<acc_t, K, D>& t, const scalar_t* __restrict__ table, scalar_t* __restrict__ out,
                  int64_t c0, int64_t c1, int64_t S, int64_t P) {
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* __restrict__ row = table + c * S;
    scalar_t* __restrict__ orow = out + c * P;
    for (int64_t i = 0; i < t.count; ++i) {
      acc_t acc = CHECKED ? t.bias[i] : acc_t(0);
      for (int k = 0; k < K; ++k) {
        if (CHECKED && !(t.valid[i] >> k & 1u)) continue;
        acc += t.w[k][i] * static_cast<acc_t>(row[t.off[k][i]]);
      }
      orow[i] = static_cast<scalar_t>(acc);
    }
  }
}

// ---- Cell-major loops (small tables, and large ones read by many corners) --------------------
// With a copy of the table in (cell, channel) layout, a point's corner rows are contiguous
// runs of channels, so the channel loop runs kLanes channels at a time in SIMD registers.
// Outputs (and output gradients) are (channel, point) rows; they go through a small
// point-major scratch block that is transposed on the way out (in). The loops are written
// once with GCC/Clang vector types and compiled twice on x86: for the baseline ISA and for
// AVX2+FMA, picked at run time.
constexpr int64_t kLanes = 8;
constexpr int64_t kCellBlock = 64;                     // channels per scratch block (a multiple of kLanes)
constexpr int64_t kScratchStride = kCellBlock + kLanes;  // not a power of two: spreads the rows over cache sets

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

#define GRAD_EXT_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define GRAD_EXT_AVX2_DISPATCH 1
#endif

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename T>
using simd_t = typename Simd<T>::type;

template <typename T>
GRAD_EXT_INLINE simd_t<T> load_lanes(const T* p) {
  simd_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
GRAD_EXT_INLINE void store_lanes(T* p, simd_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// (N_in, C, S) input -> (N_in, S + 1, Cp) with Cp = C rounded up to kLanes, padded with zeros.
// Row S is all zeros: invalid corners (weight 0) point there, so they add exact zeros even
// when the table holds inf or NaN.
at::Tensor cell_major(const at::Tensor& input, const GridGeometry& g) {
  at::Tensor t = at::zeros({g.N_in, g.S + 1, round_up(g.C, kLanes)}, input.options());
  t.narrow(1, 0, g.S).narrow(2, 0, g.C).copy_(input.view({g.N_in, g.C, g.S}).transpose(1, 2));
  return t;
}

// The arguments of both cell-major loops; `cells` is this table batch's (S + 1, Cp) copy.
template <typename T, int K, int D>
struct CellsCall {
  const CornerTile<T, K, D>* tile;
  const T* cells;
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
};

template <typename T, int K, int D>
GRAD_EXT_INLINE int64_t corner_cell(const CellsCall<T, K, D>& a, int k, int64_t i) {
  return (a.tile->valid[i] >> k & 1u) ? a.tile->off[k][i] : a.zero_cell;
}

template <typename T, int K, int D>
GRAD_EXT_INLINE void forward_cells_impl(const CellsCall<T, K, D>& a) {
  using V = simd_t<T>;
  const CornerTile<T, K, D>& t = *a.tile;
  for (int64_t b0 = a.c_begin; b0 < a.c_end; b0 += kCellBlock) {
    const int64_t b1 = std::min(a.c_end, b0 + kCellBlock), width = round_up(b1 - b0, kLanes);
    for (int64_t i = 0; i < t.count; ++i) {
      const T* rows[K];
      for (int k = 0; k < K; ++k) rows[k] = a.cells + corner_cell(a, k, i) * a.Cp + b0;
      T* o = a.scratch + i * kScratchStride;
      for (int64_t c = 0; c < width; c += kLanes) {
        V acc = load_lanes(rows[0] + c) * t.w[0][i];
        for (int k = 1; k < K; ++k) acc += load_lanes(rows[k] + c) * t.w[k][i];
        store_lanes(o + c, acc);
      }
    }
    for (int64_t c = b0; c < b1; ++c) {
      T* __restrict__ orow = a.out + c * a.P;
      const T* __restrict__ s = a.scratch + (c - b0);
      for (int64_t i = 0; i < t.count; ++i) orow[i] = s[i * kScratchStride];
    }
  }
}

template <typename T, int K, int D, bool NEED_INPUT, bool NEED_GRID>
GRAD_EXT_INLINE void backward_cells_impl(const CellsCall<T, K, D>& a) {
  using V = simd_t<T>;
  const CornerTile<T, K, D>& t = *a.tile;
  for (int64_t b0 = a.c_begin; b0 < a.c_end; b0 += kCellBlock) {
    const int64_t b1 = std::min(a.c_end, b0 + kCellBlock), width = round_up(b1 - b0, kLanes);
    for (int64_t c = b0; c < b0 + width; ++c) {
      T* __restrict__ s = a.scratch + (c - b0);
      if (c < b1) {
        const T* __restrict__ gorow = a.gout + c * a.P;
        for (int64_t i = 0; i < t.count; ++i) s[i * kScratchStride] = gorow[i];
      } else {  // padding lanes must be 0, not stale values: they meet the table's zero padding
        for (int64_t i = 0; i < t.count; ++i) s[i * kScratchStride] = T(0);
      }
    }
    for (int64_t i = 0; i < t.count; ++i) {
      if (t.valid[i] == 0u) continue;  // entirely outside: contributes nothing (even for a NaN gradient)
      const T* rows[K];
      T* grows[K];
      for (int k = 0; k < K; ++k) {
        const int64_t cell = corner_cell(a, k, i);
        rows[k] = a.cells + cell * a.Cp + b0;
        grows[k] = a.gradT + cell * a.Wt + (b0 - a.c_begin);
      }
      const T* gv = a.scratch + i * kScratchStride;
      V sum[K] = {};
      for (int64_t c = 0; c < width; c += kLanes) {
        const V g = load_lanes(gv + c);
        for (int k = 0; k < K; ++k) {
          if (NEED_GRID) sum[k] += g * load_lanes(rows[k] + c);
          if (NEED_INPUT) store_lanes(grows[k] + c, load_lanes(grows[k] + c) + g * t.w[k][i]);
        }
      }
      if (NEED_GRID) {
        T corner[K];
        for (int k = 0; k < K; ++k) {
          T s = T(0);
          for (int l = 0; l < kLanes; ++l) s += sum[k][l];
          corner[k] = s;
        }
        for (int d = 0; d < D; ++d) {
          T ga = T(0);
          for (int k = 0; k < K; ++k) ga += t.dw[k][d][i] * corner[k];
          a.gacc[d * kPointTile + i] += ga;
        }
      }
    }
  }
}

template <typename T, int K, int D>
void forward_cells_base(const CellsCall<T, K, D>& a) { forward_cells_impl(a); }
template <typename T, int K, int D, bool NEED_INPUT, bool NEED_GRID>
void backward_cells_base(const CellsCall<T, K, D>& a) { backward_cells_impl<T, K, D, NEED_INPUT, NEED_GRID>(a); }

#ifdef GRAD_EXT_AVX2_DISPATCH
template <typename T, int K, int D>
__attribute__((target("avx2,fma"))) void forward_cells_avx2(const CellsCall<T, K, D>& a) { forward_cells_impl(a); }
template <typename T, int K, int D, bool NEED_INPUT, bool NEED_GRID>
__attribute__((target("avx2,fma"))) void backward_cells_avx2(const CellsCall<T, K, D>& a) {
  backward_cells_impl<T, K, D, NEED_INPUT, NEED_GRID>(a);
}
#endif

// The SIMD level of the cell-major loops: the best this CPU has, unless the environment
// variable GRAD_EXT_CPU_SIMD asks for "baseline" (to compare or test the portable build).
bool pick_avx2() {
  const char* env = std::getenv("GRAD_EXT_CPU_SIMD");
  const std::string want = env ? env : "auto";
  TORCH_CHECK(want == "auto" || want == "baseline" || want == "avx2",
              "GRAD_EXT_CPU_SIMD must be 'auto', 'baseline' or 'avx2', got '", want, "'");
#ifdef GRAD_EXT_AVX2_DISPATCH
  const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  const bool has = false;
#endif
  TORCH_CHECK(want != "avx2" || has, "GRAD_EXT_CPU_SIMD=avx2, but this CPU or build has no AVX2+FMA");
  return has && want != "baseline";
}

bool cpu_has_avx2() {
  static const bool use = pick_avx2();
  return use;
}

template <typename T, int K, int D>
void forward_cells(const CellsCall<T, K, D>& a) {
#ifdef GRAD_EXT_AVX2_DISPATCH
  if (cpu_has_avx2()) return forward_cells_avx2(a);
#endif
  forward_cells_base(a);
}

template <typename T, int K, int D, bool NEED_INPUT, bool NEED_GRID>
void backward_cells(const CellsCall<T, K, D>& a) {
#ifdef GRAD_EXT_AVX2_DISPATCH
  if (cpu_has_avx2()) return backward_cells_avx2<T, K, D, NEED_INPUT, NEED_GRID>(a);
#endif
  backward_cells_base<T, K, D, NEED_INPUT, NEED_GRID>(a);
}

// When the cell-major loops are used: they pay one transposed copy of the table (and in the
// backward pass a private (cell, channel) gradient block per thread), which is repaid when the
// task's table rows fit in cache, or when each cell is read by many corners (the copy is one
// streaming pass; the gathers and scatters it speeds up are K per point). The thresholds were
// measured on the benchmark's drop-in shapes: the 2-D forward (4 reads per cell) is faster
// row by row, its backward and the 3-D and 4-D cases (8 and more) cell-major.
constexpr int64_t kCellsInCacheBytes = 64 * 1024;
constexpr int64_t kCellsForwardReadsPerCell = 8;
constexpr int64_t kCellsBackwardReadsPerCell = 4;
constexpr int64_t kCellsMaxPrivateBytes = 16 << 20;

// private_elem: bytes per element of the backward pass's private gradient block, 0 forward.
bool use_cells(const GridGeometry& g, int K, int64_t channel_tile, int64_t elem, int64_t reads_per_cell,
               int64_t private_elem) {
  if ((g.S + 1) * round_up(channel_tile, kLanes) * private_elem > kCellsMaxPrivateBytes) return false;
  if (channel_tile * g.S * elem <= kCellsInCacheBytes) return true;
  return g.N * g.P * K >= reads_per_cell * g.N_in * g.S;
}

template <typename scalar_t, int D, int K>
void forward_kernel(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const GridGeometry& g,
                    int interpolation, int padding, bool align_corners, const JitterParams& jitter) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t tiles_per_batch = ceil_div(g.P, kPointTile);
  const int64_t point_tiles = g.N * tiles_per_batch;
  const int64_t threads = at::get_num_threads();
  int64_t channel_tile = ceil_div(g.C, std::clamp<int64_t>(ceil_div(4 * threads, point_tiles), 1, g.C));
  const bool by_cells = use_cells(g, K, channel_tile, sizeof(scalar_t), kCellsForwardReadsPerCell, 0);
  if (by_cells) channel_tile = round_up(channel_tile, kLanes);
  const int64_t channel_tiles = ceil_div(g.C, channel_tile);
  const at::Tensor cells = by_cells ? cell_major(input, g) : at::Tensor();
  const int64_t Cp = round_up(g.C, kLanes);

  at::parallel_for(0, point_tiles * channel_tiles, 1, [&](int64_t begin, int64_t end) {
    auto tile = std::make_unique<CornerTile<acc_t, K, D>>();
    std::vector<acc_t> scratch(by_cells ? kPointTile * kScratchStride : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pt = task / channel_tiles, ct = task % channel_tiles;
      const int64_t n = pt / tiles_per_batch;
      const int64_t p0 = (pt % tiles_per_batch) * kPointTile, p1 = std::min(g.P, p0 + kPointTile);
      tile->fill(gr, n * g.P + p0, p1 - p0, g, interpolation, padding, align_corners, jitter, false);
      const int64_t b = g.N_in == 1 ? 0 : n;
      const scalar_t* table = in + b * g.C * g.S;
      scalar_t* obase = o + n * g.C * g.P + p0;
      const int64_t c0 = ct * channel_tile, c1 = std::min(g.C, c0 + channel_tile);
      // Tiles with a non-finite bias (NaN coordinates) take the checked row loop.
      if (by_cells && !tile->biased) {
        forward_cells<scalar_t, K, D>({tile.get(), cells.data_ptr<scalar_t>() + b * (g.S + 1) * Cp, Cp, g.S, c0, c1,
                                       g.P, scratch.data(), obase, nullptr, nullptr, 0, nullptr});
      } else if (tile->checked) {
        forward_rows<scalar_t, acc_t, K, D, true>(*tile, table, obase, c0, c1, g.S, g.P);
      } else {
        forward_rows<scalar_t, acc_t, K, D, false>(*tile, table, obase, c0, c1, g.S, g.P);
      }
    }
  });
}

// Accumulates one tile of points over channels [c0, c1): the input gradient into whole rows
// (owned by the calling task) and the grid gradient per point into gacc[a][i].
template <typename scalar_t, typename acc_t, int K, int D, bool NEED_INPUT, bool NEED_GRID, bool CHECKED>
void backward_rows(const CornerTile<acc_t, K, D>& t, const scalar_t* __restrict__ table,
                   scalar_t* __restrict__ gtable, const scalar_t* __restrict__ gout, acc_t* __restrict__ gacc,
                   int64_t c0, int64_t c1, int64_t S, int64_t P) {
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* __restrict__ row = table + c * S;
    scalar_t* __restrict__ grow = NEED_INPUT ? gtable + c * S : nullptr;
    const scalar_t* __restrict__ gorow = gout + c * P;
    for (int64_t i = 0; i < t.count; ++i) {
      const acc_t gv = static_cast<acc_t>(gorow[i]);
      for (int k = 0; k < K; ++k) {
        if (CHECKED && !(t.valid[i] >> k & 1u)) continue;
        const int64_t off = t.off[k][i];
        if (NEED_INPUT) grow[off] += static_cast<scalar_t>(t.w[k][i] * gv);
        if (NEED_GRID) {
          const acc_t v = gv * static_cast<acc_t>(row[off]);
          for (int a = 0; a < D; ++a) gacc[a * kPointTile + i] += t.dw[k][a][i] * v;
        }
      }
    }
  }
}

template <typename scalar_t, int D, int K, bool NEED_INPUT, bool NEED_GRID>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& grid,
                     at::Tensor& grad_input, at::Tensor& grad_grid, const GridGeometry& g, int interpolation,
                     int padding, bool align_corners, const JitterParams& jitter) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* gi = NEED_INPUT ? grad_input.data_ptr<scalar_t>() : nullptr;

  // Tasks own (table batch, channel tile); the grid gradient is summed per channel tile
  // into its own slice of `partial` and reduced in a fixed order afterwards.
  const int64_t threads = at::get_num_threads();
  int64_t channel_tile = ceil_div(g.C, std::clamp<int64_t>(ceil_div(2 * threads, g.N_in), 1, g.C));
  const bool by_cells =
      use_cells(g, K, channel_tile, sizeof(scalar_t), kCellsBackwardReadsPerCell, sizeof(acc_t));
  if (by_cells) channel_tile = round_up(channel_tile, kLanes);
  const int64_t channel_tiles = ceil_div(g.C, channel_tile);
  const at::Tensor cells = by_cells ? cell_major(input, g) : at::Tensor();
  const int64_t Cp = round_up(g.C, kLanes);
  const int64_t total_points = g.N * g.P;
  at::Tensor partial;
  acc_t* part = nullptr;
  if (NEED_GRID) {
    partial = at::zeros({channel_tiles, D, total_points}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    part = partial.data_ptr<acc_t>();
  }

  at::parallel_for(0, g.N_in * channel_tiles, 1, [&](int64_t begin, int64_t end) {
    auto tile = std::make_unique<CornerTile<acc_t, K, D>>();
    std::vector<acc_t> gacc(NEED_GRID ? kPointTile * D : 0);
    std::vector<acc_t> scratch(by_cells ? kPointTile * kScratchStride : 0);
    const int64_t Wt = by_cells ? channel_tile : 0;  // a multiple of kLanes
    std::vector<acc_t> gradT(NEED_INPUT ? (g.S + 1) * Wt : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channel_tiles, ct = task % channel_tiles;
      const int64_t c0 = ct * channel_tile, c1 = std::min(g.C, c0 + channel_tile);
      const int64_t n_begin = g.N_in == 1 ? 0 : b, n_end = g.N_in == 1 ? g.N : b + 1;
      const scalar_t* table = in + b * g.C * g.S;
      scalar_t* gtable = NEED_INPUT ? gi + b * g.C * g.S : nullptr;
      std::fill(gradT.begin(), gradT.end(), acc_t(0));
      for (int64_t n = n_begin; n < n_end; ++n) {
        for (int64_t p0 = 0; p0 < g.P; p0 += kPointTile) {
          const int64_t p1 = std::min(g.P, p0 + kPointTile);
          tile->fill(gr, n * g.P + p0, p1 - p0, g, interpolation, padding, align_corners, jitter, NEED_GRID);
          std::fill(gacc.begin(), gacc.end(), acc_t(0));
          const scalar_t* gout = go + n * g.C * g.P + p0;
          if (by_cells && !tile->biased) {
            backward_cells<scalar_t, K, D, NEED_INPUT, NEED_GRID>(
                {tile.get(), cells.data_ptr<scalar_t>() + b * (g.S + 1) * Cp, Cp, g.S, c0, c1, g.P, scratch.data(),
                 nullptr, gout, gradT.data(), Wt, gacc.data()});
          } else if (tile->checked) {
            backward_rows<scalar_t, acc_t, K, D, NEED_INPUT, NEED_GRID, true>(*tile, table, gtable, gout, gacc.data(), c0, c1, g.S, g.P);
          } else {
            backward_rows<scalar_t, acc_t, K, D, NEED_INPUT, NEED_GRID, false>(*tile, table, gtable, gout, gacc.data(), c0, c1, g.S, g.P);
          }
          if (NEED_GRID) {
            for (int a = 0; a < D; ++a) {
              acc_t* dst = part + (ct * D + a) * total_points + n * g.P + p0;
              for (int64_t i = 0; i < p1 - p0; ++i) dst[i] += gacc[a * kPointTile + i];
            }
          }
        }
      }
      if (NEED_INPUT && by_cells) {  // the cell-major part of this task's rows
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t s = 0; s < g.S; ++s) gtable[c * g.S + s] += static_cast<scalar_t>(gradT[s * Wt + c - c0]);
      }
    }
  });

  if (!NEED_GRID) return;  // nearest: the output is piecewise constant, its grid gradient stays 0
  scalar_t* gg = grad_grid.data_ptr<scalar_t>();
  const NonFinitePolicy policy = cpu_policy(D);
  at::parallel_for(0, total_points, 256, [&](int64_t begin, int64_t end) {
    PointCorners<acc_t, D> pc;
    for (int64_t i = begin; i < end; ++i) {
      point_corners<scalar_t, D>(gr, i, g, interpolation, padding, align_corners, policy, jitter, true, pc);
      for (int a = 0; a < D; ++a) {
        acc_t s = pc.grad_bias[a];
        for (int64_t ct = 0; ct < channel_tiles; ++ct) s += part[(ct * D + a) * total_points + i];
        gg[i * D + (D - 1 - a)] = static_cast<scalar_t>(s * pc.mult[a]);
      }
    }
  });
}

// ---- Small shared tables read by one point per image, or by one image of points ---------
// The global grid of GRAD: one (1, C, r, r) table with C in the hundred thousands and only
// S = r^D cells per channel, sampled at Q = N * P points with N == 1 or P == 1. Every output
// is then a matrix product with the dense S x Q weight matrix W (K nonzeros per column):
//   forward   out (C x Q) = T (C x S) @ W
//   backward  dT (C x S) = dOut (C x Q) @ W^T,   M (S x Q) = T^T @ dOut,
//             dgrid[q, a] = sum_k dW_k/da[q] * M[off_k(q), q].
// Doing S / K times the multiply-adds of the gather/scatter loops, but in BLAS, is several
// times faster while S <= kDenseMaxCellsPerCorner * K, and it has no scatter conflicts.
constexpr int64_t kDenseMaxCellsPerCorner = 4;
constexpr int64_t kDenseMinChannels = 256;

bool dense_eligible(const GridGeometry& g, int interpolation) {
  const int64_t K = int64_t(1) << g.D;
  return interpolation == kBilinear && g.N_in == 1 && (g.N == 1 || g.P == 1) &&
         g.S <= kDenseMaxCellsPerCorner * K && g.C >= kDenseMinChannels;
}

// Corners of all Q points; false when a point has a non-finite bias (the sparse kernels
// handle those points).
template <typename scalar_t, int D>
bool dense_corners(const at::Tensor& grid, const GridGeometry& g, int padding, bool align_corners,
                   const JitterParams& jitter, bool with_grad,
                   std::vector<PointCorners<at::opmath_type<scalar_t>, D>>& corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = g.N * g.P;
  const NonFinitePolicy policy = cpu_policy(D);
  const scalar_t* gr = grid.data_ptr<scalar_t>();
  corners.resize(Q);
  for (int64_t q = 0; q < Q; ++q) {
    point_corners<scalar_t, D>(gr, q, g, kBilinear, padding, align_corners, policy, jitter, with_grad, corners[q]);
    if (!(corners[q].bias == acc_t(0))) return false;
  }
  return true;
}

template <typename scalar_t, int D>
at::Tensor dense_weights(const std::vector<PointCorners<at::opmath_type<scalar_t>, D>>& corners,
                         const GridGeometry& g, const at::TensorOptions& options) {
  const int64_t Q = static_cast<int64_t>(corners.size());
  at::Tensor W = at::zeros({g.S, Q}, options);
  scalar_t* w = W.data_ptr<scalar_t>();
  for (int64_t q = 0; q < Q; ++q) {
    const auto& pc = corners[q];
    for (int k = 0; k < (1 << D); ++k)
      if (pc.valid >> k & 1u) w[pc.offset[k] * Q + q] += static_cast<scalar_t>(pc.weight[k]);
  }
  return W;
}

// (C x Q) view of an output-shaped tensor: (1, C, P) when N == 1, the transpose of (N, C) when P == 1.
at::Tensor channels_by_points(const at::Tensor& t, const GridGeometry& g) {
  return g.N == 1 ? t.view({g.C, g.P}) : t.view({g.N, g.C}).t();
}

template <typename scalar_t, int D>
bool dense_forward(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const GridGeometry& g,
                   int padding, bool align_corners, const JitterParams& jitter) {
  std::vector<PointCorners<at::opmath_type<scalar_t>, D>> corners;
  if (!dense_corners<scalar_t, D>(grid, g, padding, align_corners, jitter, false, corners)) return false;
  const at::Tensor W = dense_weights<scalar_t, D>(corners, g, input.options());
  const at::Tensor T = input.view({g.C, g.S});
  if (g.N == 1) {
    at::Tensor out_view = out.view({g.C, g.P});
    at::mm_out(out_view, T, W);
  } else {
    at::Tensor out_view = out.view({g.N, g.C});
    at::mm_out(out_view, W.t(), T.t());
  }
  return true;
}

template <typename scalar_t, int D>
bool dense_backward(const at::Tensor& gout, const at::Tensor& input, const at::Tensor& grid,
                    at::Tensor& grad_input, at::Tensor& grad_grid, const GridGeometry& g, int padding,
                    bool align_corners, const JitterParams& jitter, bool need_input, bool need_grid) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<PointCorners<acc_t, D>> corners;
  if (!dense_corners<scalar_t, D>(grid, g, padding, align_corners, jitter, need_grid, corners)) return false;
  const at::Tensor G = channels_by_points(gout, g);
  const at::Tensor T = input.view({g.C, g.S});
  if (need_input) {
    const at::Tensor W = dense_weights<scalar_t, D>(corners, g, input.options());
    at::Tensor grad_view = grad_input.view({g.C, g.S});
    at::mm_out(grad_view, G, W.t());
  }
  if (!need_grid) return true;
  const at::Tensor M = at::mm(T.t(), G).contiguous();  // (S, Q)
  const scalar_t* m = M.data_ptr<scalar_t>();
  scalar_t* gg = grad_grid.data_ptr<scalar_t>();
  const int64_t Q = g.N * g.P;
  for (int64_t q = 0; q < Q; ++q) {
    const auto& pc = corners[q];
    for (int a = 0; a < D; ++a) {
      acc_t s = pc.grad_bias[a];
      for (int k = 0; k < (1 << D); ++k)
        if (pc.valid >> k & 1u) s += corner_weight_grad(pc, k, a) * static_cast<acc_t>(m[pc.offset[k] * Q + q]);
      gg[q * D + (D - 1 - a)] = static_cast<scalar_t>(s * pc.mult[a]);
    }
  }
  return true;
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
  at::Tensor out = empty_output(g.out_shape, input_.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous();
  const JitterParams jitter = cpu_jitter(jitter_std, jitter_prob, jitter_mode, jitter_seed);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sample_grid_cpu", [&] {
    dispatch_dim(g.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (dense_eligible(g, static_cast<int>(interpolation)) &&
          dense_forward<scalar_t, D>(input, grid, out, g, static_cast<int>(padding), align_corners, jitter))
        return;
      auto run = [&](auto k) {
        forward_kernel<scalar_t, D, decltype(k)::value>(input, grid, out, g, static_cast<int>(interpolation),
                                                        static_cast<int>(padding), align_corners, jitter);
      };
      if (interpolation == kNearest) run(std::integral_constant<int, 1>{});
      else run(std::integral_constant<int, 1 << D>{});
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
  at::Tensor grad_input = input_requires_grad ? zeros_output(input_.sizes(), input_.options()) : at::empty({0}, input_.options());
  at::Tensor grad_grid = grid_requires_grad ? zeros_output(grid_.sizes(), grid_.options()) : at::empty({0}, grid_.options());
  if (g.N * g.C * g.P == 0 || (!input_requires_grad && !grid_requires_grad)) return {grad_input, grad_grid};
  const at::Tensor input = input_.contiguous(), grid = grid_.contiguous(), gout = grad_output.contiguous();
  const JitterParams jitter = cpu_jitter(jitter_std, jitter_prob, jitter_mode, jitter_seed);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sample_grid_backward_cpu", [&] {
    dispatch_dim(g.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (dense_eligible(g, static_cast<int>(interpolation)) &&
          dense_backward<scalar_t, D>(gout, input, grid, grad_input, grad_grid, g, static_cast<int>(padding),
                                      align_corners, jitter, input_requires_grad, grid_requires_grad))
        return;
      auto run = [&](auto k, auto need_input, auto need_grid) {
        backward_kernel<scalar_t, D, decltype(k)::value, decltype(need_input)::value, decltype(need_grid)::value>(
            gout, input, grid, grad_input, grad_grid, g, static_cast<int>(interpolation), static_cast<int>(padding),
            align_corners, jitter);
      };
      using T = std::true_type;
      using F = std::false_type;
      constexpr auto bilinear = std::integral_constant<int, 1 << D>{};
      if (interpolation == kNearest) {
        if (input_requires_grad) run(std::integral_constant<int, 1>{}, T{}, F{});
      } else if (input_requires_grad && grid_requires_grad) {
        run(bilinear, T{}, T{});
      } else if (input_requires_grad) {
        run(bilinear, T{}, F{});
      } else {
        run(bilinear, F{}, T{});
      }
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

std::string cpu_simd() { return cpu_has_avx2() ? "avx2" : "baseline"; }

TORCH_LIBRARY_IMPL(grad_ext, CPU, m) {
  m.impl("sample_grid", &sample_grid_cpu);
  m.impl("sample_grid_backward", &sample_grid_backward_cpu);
  m.impl("jitter_noise", &jitter_noise_cpu);
}

}  // namespace grad_ext
