// Block transposes between the (channel, cell or point) layout of tensors and the (cell or
// point, channel) layout of the cell-major loops, 8 x 8 elements at a time in vector registers
// (GCC/Clang vector shuffles, so that the same code builds for the baseline ISA and for AVX2),
// which reads and writes whole vectors where an element-wise strided copy touches a cache line
// per element.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cpu/simd.h"

namespace grad_ext {
namespace cpu {

static_assert(kLanes == 8, "the register transpose is written for 8 lanes");

// A streaming (non-temporal) store of 8 floats to a 32-byte aligned address: written straight to
// memory, without first reading the line into the cache. Only for code compiled for AVX (the
// loops' AVX2 build), which is why it is inline assembly and not an intrinsic: the generic
// functions below are compiled for the baseline ISA, and GCC refuses to inline an AVX intrinsic
// into them even when they are themselves only ever inlined into AVX2 code.
GRAD_EXT_INLINE void stream_lanes(float* p, simd_t<float> v) {
#ifdef GRAD_EXT_AVX2_DISPATCH
  asm("vmovntps %1, %0" : "=m"(*reinterpret_cast<simd_t<float>*>(p)) : "x"(v));
#else
  store_lanes(p, v);  // not reached: only the x86 AVX2 build streams
#endif
}
// Orders the streaming stores before whatever follows (another thread reading the output).
GRAD_EXT_INLINE void stream_fence() {
#ifdef GRAD_EXT_AVX2_DISPATCH
  asm volatile("sfence" ::: "memory");
#endif
}

template <bool STREAM, typename T>
GRAD_EXT_INLINE void store_row(T* p, simd_t<T> v) {
  if constexpr (STREAM) {
    static_assert(std::is_same<T, float>::value, "streaming stores are for float outputs");
    stream_lanes(p, v);
  } else {
    store_lanes(p, v);
  }
}

// dst[j * ds + i] = (or +=, when ADD) src[i * ss + j] for i, j < 8. STREAM: dst's rows are
// written with streaming stores (dst and ds * sizeof(T) 32-byte aligned; not with ADD).
template <bool ADD, typename T, bool STREAM = false>
GRAD_EXT_INLINE void transpose8x8(const T* __restrict__ src, int64_t ss, T* __restrict__ dst, int64_t ds) {
  static_assert(!(ADD && STREAM), "a streamed row is not read back");
  using V = simd_t<T>;
  V r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load_lanes(src + i * ss);
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs: (a0 b0 a1 b1 | a4 b4 a5 b5), (a2 b2 a3 b3 | ...)
    t[i] = GRAD_EXT_SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = GRAD_EXT_SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // pairs of pairs: (a0 b0 c0 d0 | a4 b4 c4 d4) ...
    u[i] = GRAD_EXT_SHUFFLE(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = GRAD_EXT_SHUFFLE(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = GRAD_EXT_SHUFFLE(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = GRAD_EXT_SHUFFLE(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {  // halves: rows 0-3 of the first four, rows 4-7 of the last four
    V lo = GRAD_EXT_SHUFFLE(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    V hi = GRAD_EXT_SHUFFLE(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    if (ADD) {
      lo += load_lanes(dst + i * ds);
      hi += load_lanes(dst + (i + 4) * ds);
    }
    store_row<STREAM>(dst + i * ds, lo);
    store_row<STREAM>(dst + (i + 4) * ds, hi);
  }
}

template <bool ADD, typename T>
GRAD_EXT_INLINE void transpose_scalar(const T* __restrict__ src, int64_t ss, T* __restrict__ dst, int64_t ds,
                                      int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j) dst[j * ds + i] = ADD ? dst[j * ds + i] + src[i * ss + j] : src[i * ss + j];
}

// dst[j * ds + i] = (or +=, when ADD) src[i * ss + j] for i < rows, j < cols (the blocks may
// not overlap). The outer loop runs over 8-row slabs of the side whose rows lie farther
// apart (channel rows of a tensor are often a multiple of 4 KiB apart, so that all of them
// fall into one set of the L1 cache): each slab's 8 rows are then read or written whole
// before the next, instead of a part of every row at a time.
template <bool ADD, typename T, bool STREAM = false>
GRAD_EXT_INLINE void transpose_block(const T* __restrict__ src, int64_t ss, T* __restrict__ dst, int64_t ds,
                                     int64_t rows, int64_t cols) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  if (ss >= ds) {
    for (int64_t i = 0; i < rows8; i += 8)
      for (int64_t j = 0; j < cols8; j += 8) transpose8x8<ADD, T, STREAM>(src + i * ss + j, ss, dst + j * ds + i, ds);
  } else {
    for (int64_t j = 0; j < cols8; j += 8)
      for (int64_t i = 0; i < rows8; i += 8) transpose8x8<ADD, T, STREAM>(src + i * ss + j, ss, dst + j * ds + i, ds);
  }
  transpose_scalar<ADD>(src, ss, dst, ds, 0, rows8, cols8, cols);
  transpose_scalar<ADD>(src, ss, dst, ds, rows8, rows, 0, cols);
}

}  // namespace cpu
}  // namespace grad_ext
