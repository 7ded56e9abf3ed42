// The CUDA execution model on the CPU: what the project's kernels use of CUDA, for the build
// of csrc/cuda as host C++ (GRAD_EXT_CUDA_EMULATION; cuda/runtime.h includes this header).
//
// A launch runs its grid's blocks on worker threads, one block at a time per worker. Each CUDA
// thread of a block is a fiber with its own stack; a block's fibers take turns on their
// worker and switch only where CUDA threads can wait for each other: __syncthreads, a warp
// shuffle, and the end of the kernel. Warps are 32 consecutive threads of the block (x fastest,
// then y, then z), as on the GPU. What the emulation checks and what it leaves out is in
// README.md ("CUDA kernels without a GPU").
//
// ThreadSanitizer sees every fiber as a thread of its own, and the only ordering between them
// is what CUDA gives: __syncthreads orders the accesses of its block's threads, shuffles pass
// values and order nothing, atomics are atomic, and the end of a launch orders everything.
#pragma once
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

#include "cuda/device_limits.h"

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's function and variable qualifiers. Static __shared__ variables are per worker thread,
// hence per running block; the dynamic shared memory is a fresh buffer for every block.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define GRAD_EXT_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::grad_ext::emulation::dynamic_shared())

#define threadIdx (::grad_ext::emulation::thread_index())
#define blockIdx (::grad_ext::emulation::block_index())
#define blockDim (::grad_ext::emulation::block_dim())
#define gridDim (::grad_ext::emulation::grid_dim())

#define GRAD_EXT_EMULATION_SITE (::grad_ext::emulation::Site{__FILE__, __LINE__})
#define __syncthreads() ::grad_ext::emulation::syncthreads(GRAD_EXT_EMULATION_SITE)
#define __shfl_sync(...) \
  ::grad_ext::emulation::shuffle(::grad_ext::emulation::Shuffle::kIdx, GRAD_EXT_EMULATION_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) \
  ::grad_ext::emulation::shuffle(::grad_ext::emulation::Shuffle::kUp, GRAD_EXT_EMULATION_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) \
  ::grad_ext::emulation::shuffle(::grad_ext::emulation::Shuffle::kDown, GRAD_EXT_EMULATION_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) \
  ::grad_ext::emulation::shuffle(::grad_ext::emulation::Shuffle::kXor, GRAD_EXT_EMULATION_SITE, __VA_ARGS__)

namespace grad_ext {
namespace emulation {

struct Site {
  const char* file;
  int line;
};

// The shuffle forms: PTX shfl.sync's modes idx, up, down and bfly.
enum class Shuffle : int { kIdx, kUp, kDown, kXor };

const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_shared();
void syncthreads(Site site);
// Exchanges 1 to 8 bytes within the calling warp; every lane named in `mask` must call the same
// shuffle (same place, mask and width) before any of them continues.
uint64_t shuffle_bits(Shuffle op, Site site, unsigned mask, uint64_t bits, int lane_arg, int width);
// A report of misuse that no sanitizer sees (a misaligned atomic): fails the launch.
[[noreturn]] void fail(const std::string& what);

template <typename T>
T shuffle(Shuffle op, Site site, unsigned mask, T var, int lane_arg, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move 1 to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle_bits(op, site, mask, bits, lane_arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ---- launches -----------------------------------------------------------------------------

struct Stream {};

// How blocks and threads take turns: in index order, in reverse, or shuffled from a seed. The
// order changes which block's atomics come first and, inside a block, which thread runs first
// between two synchronisation points.
enum class Order : int { kAscending, kDescending, kRandom };

struct Settings {
  const cuda::DeviceLimits* device = &cuda::h100_sxm();
  int workers = 2;  // blocks run on this many threads at once
  Order order = Order::kAscending;
  uint64_t seed = 0;
  bool execute = true;  // false: check and record launches without running them
};

Settings settings();
void configure(const Settings& s);

struct Launch {
  std::string kernel;
  dim3 grid, block;
  int64_t dynamic_smem = 0;
  cuda::KernelResources resources;
};

// Checks `launch` against the device (as the CUDA runtime would refuse it), records it, and runs
// `body` (the kernel call) on every thread of every block. Throws a c10::Error that names the
// kernel when the launch is refused or its threads misuse barriers or shuffles.
void run(const Launch& launch, const std::function<void()>& body);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
void set_max_dynamic_smem(const std::string& kernel, int64_t bytes);

// atomicAdd on float and double: a compare-and-swap loop with relaxed ordering, as CUDA's
// atomics are relaxed; it returns the old value.
template <typename T>
T atomic_add(T* address, T value) {
  if (reinterpret_cast<uintptr_t>(address) % sizeof(T) != 0) fail("atomicAdd on a misaligned address");
  T old, desired;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  do {
    desired = old + value;
  } while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}

}  // namespace emulation
}  // namespace grad_ext

inline float atomicAdd(float* address, float value) { return ::grad_ext::emulation::atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return ::grad_ext::emulation::atomic_add(address, value); }
