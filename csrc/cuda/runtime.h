// The device as the launchers see it, one interface for the GPU build and for the CPU emulation
// (GRAD_EXT_CUDA_EMULATION, cuda/emulation/emulation.h): streams and device guards, the
// device's limits, a kernel's resources and occupancy, and launch<Kernel>(grid, block, smem,
// stream, args...). Every decision of the launchers (which kernel, grid, block, shared memory,
// slices and groups) is made by the same code in both builds from these answers.
//
// The GPU build answers from the CUDA runtime, caching the device queries (cudaDeviceProp, the
// occupancy API, cudaFuncSetAttribute) per device and kernel shape. The emulation answers from
// the tables of device_limits.h (H100 SXM by default) and the resource table of
// kernel_resources.h (cuobjdump of the CUDA build), and runs the kernels on the CPU.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda/device_limits.h"
#include "cuda/kernel_resources.h"
#include "cuda/launch_log.h"

#if defined(GRAD_EXT_CUDA_EMULATION)
#include "cuda/emulation/emulation.h"
// The emulated kernels take CPU tensors, under their own op namespace.
#define GRAD_EXT_CUDA_OPS grad_ext_emulated
#define GRAD_EXT_CUDA_KEY CPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#define GRAD_EXT_CUDA_OPS grad_ext
#define GRAD_EXT_CUDA_KEY CUDA
// The dynamic shared memory of a kernel, aligned to 16 bytes (what CUDA guarantees of it).
#define GRAD_EXT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

// A kernel's signature as GCC spells it, "... [with auto Kernel = ns::f<T, 2>]": at global scope,
// where the names in it come fully qualified.
template <auto Kernel>
const char* grad_ext_kernel_signature() {
  return __PRETTY_FUNCTION__;
}

namespace grad_ext {
namespace cuda {

// The alignment of GRAD_EXT_DYNAMIC_SHARED's buffer, which shared-memory layouts build on.
constexpr int64_t kDynamicSharedAlignment = 16;

// "grad_ext::cuda::forward_points_kernel<float, 2, 2>": the name kernel_resources.h lists.
template <auto Kernel>
const std::string& kernel_name() {
  static const std::string name = kernel_name_from_signature(grad_ext_kernel_signature<Kernel>());
  return name;
}

// The row of kernel_resources.h for a kernel, or nullptr.
inline const KernelResourceRow* resource_row(const std::string& name) {
  static const std::map<std::string, const KernelResourceRow*> rows = [] {
    std::map<std::string, const KernelResourceRow*> m;
    for (const auto& r : kKernelResources) m.emplace(r.name, &r);
    return m;
  }();
  const auto it = rows.find(name);
  return it == rows.end() ? nullptr : it->second;
}

inline KernelResources as_resources(const KernelResourceRow& r) {
  return KernelResources{r.registers, r.static_smem, r.local_bytes};
}

#if defined(GRAD_EXT_CUDA_EMULATION)

using Stream = emulation::Stream;
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline Stream current_stream() { return Stream{}; }
inline const DeviceLimits& device_limits() { return *emulation::settings().device; }

template <auto Kernel>
KernelResources kernel_resources() {
  const KernelResourceRow* row = resource_row(kernel_name<Kernel>());
  TORCH_CHECK(row != nullptr, "CUDA emulation: ", kernel_name<Kernel>(),
              " is not in csrc/cuda/kernel_resources.h; rebuild the CUDA kernels and run "
              "python scripts/kernel_resources.py --write");
  return as_resources(*row);
}

// Blocks of Kernel resident per multiprocessor, at least 1; opts the kernel in to more than
// the default dynamic shared memory where it needs it.
template <auto Kernel>
int64_t resident_blocks(int threads, int64_t dynamic_smem) {
  if (needs_smem_opt_in(device_limits(), kernel_resources<Kernel>(), dynamic_smem)) {
    emulation::set_max_dynamic_smem(kernel_name<Kernel>(), dynamic_smem);
  }
  return std::max(1, occupancy(device_limits(), kernel_resources<Kernel>(), threads, dynamic_smem));
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, int64_t dynamic_smem, Stream, const Args&... args) {
  emulation::run(emulation::Launch{kernel_name<Kernel>(), grid, block, dynamic_smem, kernel_resources<Kernel>()},
                 [&] { Kernel(args...); });
}

#else  // the GPU build

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }

// This device's limits, read once per device from cudaDeviceProp.
inline const DeviceLimits& device_limits() {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    const cudaDeviceProp* p = at::cuda::getDeviceProperties(device);
    DeviceLimits d;
    d.name = p->name;
    d.major = p->major;
    d.minor = p->minor;
    d.sm_count = p->multiProcessorCount;
    d.smem_per_sm = static_cast<int64_t>(p->sharedMemPerMultiprocessor);
    d.smem_per_block = static_cast<int64_t>(p->sharedMemPerBlock);
    d.smem_per_block_optin = static_cast<int64_t>(p->sharedMemPerBlockOptin);
    d.reserved_smem_per_block = static_cast<int64_t>(p->reservedSharedMemPerBlock);
    d.max_threads_per_block = p->maxThreadsPerBlock;
    d.max_threads_per_sm = p->maxThreadsPerMultiProcessor;
    d.max_blocks_per_sm = p->maxBlocksPerMultiProcessor;
    d.regs_per_sm = p->regsPerMultiprocessor;
    d.regs_per_block = p->regsPerBlock;
    for (int a = 0; a < 3; ++a) {
      d.max_grid[a] = p->maxGridSize[a];
      d.max_block[a] = p->maxThreadsDim[a];
    }
    d.warp_size = p->warpSize;
    d.global_memory_bytes = static_cast<int64_t>(p->totalGlobalMem);
    it = cache.emplace(device, d).first;
  }
  return it->second;
}

// A kernel's registers, static shared memory and local memory, from cudaFuncGetAttributes.
template <auto Kernel>
KernelResources kernel_resources() {
  cudaFuncAttributes a;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a, Kernel));
  return KernelResources{a.numRegs, static_cast<int64_t>(a.sharedSizeBytes), static_cast<int64_t>(a.localSizeBytes)};
}

// Blocks of Kernel resident per multiprocessor (the occupancy API), at least 1; opts the kernel
// in to more than the default dynamic shared memory where it needs it. Cached per device and
// launch shape: the queries cost microseconds, a kernel here tens of them.
template <auto Kernel>
int64_t resident_blocks(int threads, int64_t dynamic_smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int64_t>, int> cache;
  static std::map<int, int64_t> opted_in;  // per device, the largest limit set so far
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, threads, dynamic_smem);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  if (needs_smem_opt_in(device_limits(), kernel_resources<Kernel>(), dynamic_smem) && dynamic_smem > opted_in[device]) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_smem)));
    opted_in[device] = dynamic_smem;
  }
  int blocks = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads, static_cast<size_t>(dynamic_smem)));
  blocks = std::max(blocks, 1);
  cache.emplace(key, blocks);
  return blocks;
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, int64_t dynamic_smem, Stream stream, const Args&... args) {
  if (launch_log_enabled()) {  // what ran, and the occupancy model beside the runtime's answer
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const KernelResourceRow* row = resource_row(kernel_name<Kernel>());
    const DeviceLimits& d = device_limits();
    log_launch(LaunchRecord{kernel_name<Kernel>(),
                            {grid.x, grid.y, grid.z},
                            {block.x, block.y, block.z},
                            dynamic_smem,
                            kernel_resources<Kernel>(),
                            static_cast<int>(resident_blocks<Kernel>(threads, dynamic_smem)),
                            row != nullptr ? occupancy(d, as_resources(*row), threads, dynamic_smem) : -1,
                            d.name,
                            true});
  }
  // clang-format reads a .h as C++ and would split the launch brackets.
  // clang-format off
  Kernel<<<grid, block, static_cast<size_t>(dynamic_smem), stream>>>(args...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace cuda
}  // namespace grad_ext
