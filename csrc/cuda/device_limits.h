// What the launchers know of a GPU, as data: the limits of one device and the occupancy rules
// that turn a kernel's registers and shared memory into resident blocks per multiprocessor.
// On a GPU the limits are read from the CUDA runtime (runtime.h); the emulation takes them
// from the tables below. Host code only, no CUDA headers: both builds include it.
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

namespace grad_ext {
namespace cuda {

struct DeviceLimits {
  std::string name;
  int major = 0, minor = 0;             // compute capability
  int sm_count = 0;                     // cudaDeviceProp::multiProcessorCount
  int64_t smem_per_sm = 0;              // ::sharedMemPerMultiprocessor
  int64_t smem_per_block = 0;           // ::sharedMemPerBlock: a block's limit without opting in
  int64_t smem_per_block_optin = 0;     // ::sharedMemPerBlockOptin
  int64_t reserved_smem_per_block = 0;  // ::reservedSharedMemPerBlock
  int max_threads_per_block = 0;
  int max_threads_per_sm = 0;
  int max_blocks_per_sm = 0;
  int regs_per_sm = 0;
  int regs_per_block = 0;
  int64_t max_grid[3] = {0, 0, 0};
  int max_block[3] = {0, 0, 0};
  int warp_size = 0;
  double memory_bandwidth_gbs = 0;  // datasheet figures, for rooflines (0 where read off a device)
  int64_t global_memory_bytes = 0;
};

// Compute capability 9.0, as the CUDA C++ Programming Guide's table of technical
// specifications gives it: 228 KB of shared memory per multiprocessor (1 KB of it reserved
// per block, so at most 227 KB for one block), 64K registers, 2048 threads and 32 blocks.
inline DeviceLimits hopper_limits(const char* name, int sm_count, double bandwidth_gbs, int64_t memory_bytes) {
  DeviceLimits d;
  d.name = name;
  d.major = 9;
  d.minor = 0;
  d.sm_count = sm_count;
  d.smem_per_sm = 228 * 1024;
  d.smem_per_block = 48 * 1024;
  d.smem_per_block_optin = 227 * 1024;
  d.reserved_smem_per_block = 1024;
  d.max_threads_per_block = 1024;
  d.max_threads_per_sm = 2048;
  d.max_blocks_per_sm = 32;
  d.regs_per_sm = 64 * 1024;
  d.regs_per_block = 64 * 1024;
  d.max_grid[0] = INT_MAX;
  d.max_grid[1] = d.max_grid[2] = 65535;
  d.max_block[0] = d.max_block[1] = 1024;
  d.max_block[2] = 64;
  d.warp_size = 32;
  d.memory_bandwidth_gbs = bandwidth_gbs;
  d.global_memory_bytes = memory_bytes;
  return d;
}

// The two GPUs this project is measured on (datasheet: H100 SXM 80 GB HBM3 at 3.35 TB/s;
// H200 141 GB HBM3e at 4.8 TB/s; both 132 multiprocessors of the same Hopper die).
inline const DeviceLimits& h100_sxm() {
  static const DeviceLimits d = hopper_limits("NVIDIA H100 80GB HBM3", 132, 3350, int64_t(80) << 30);
  return d;
}
inline const DeviceLimits& h200() {
  static const DeviceLimits d = hopper_limits("NVIDIA H200", 132, 4800, int64_t(141) << 30);
  return d;
}

// The table of a device by its short name ("h100", "h200"); nullptr for another name.
inline const DeviceLimits* device_table(const std::string& name) {
  if (name == "h100") return &h100_sxm();
  if (name == "h200") return &h200();
  return nullptr;
}

// What one compiled kernel takes of a multiprocessor (cuobjdump -res-usage of the CUDA build:
// REG, SHARED, LOCAL); kernel_resources.h lists every kernel of this project.
struct KernelResources {
  int registers = 0;
  int64_t static_smem = 0;
  int64_t local_bytes = 0;  // per thread; > 0 means spills or a stack frame
};

// Whether a launch must first raise the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize:
// without it a block may use smem_per_block (48 KB) of static and dynamic shared memory together.
inline bool needs_smem_opt_in(const DeviceLimits& d, const KernelResources& k, int64_t dynamic_smem) {
  return dynamic_smem + k.static_smem > d.smem_per_block;
}

// Resident blocks per multiprocessor of a kernel launched with `threads` threads and
// `dynamic_smem` bytes of dynamic shared memory; 0 when one block does not fit. The rules of
// CUDA's occupancy calculator (cuda_occupancy.h) for compute capability 8.x/9.x with no
// shared-memory carveout preference and partitioned global caching off:
//  - warps: max_threads_per_sm / 32 warps in all, a block's rounded up to whole warps;
//  - registers: given to warps in units of 256, from 4 sub-partitions of regs_per_sm / 4
//    each; a block must also fit regs_per_block with its warps rounded up to 4;
//  - shared memory: static + dynamic + the reserved 1 KB, rounded up to 128 bytes, against
//    smem_per_sm; no more than smem_per_block_optin + the reserved 1 KB for one block;
//  - at most max_blocks_per_sm blocks.
inline int occupancy(const DeviceLimits& d, const KernelResources& k, int threads, int64_t dynamic_smem) {
  constexpr int kRegUnit = 256, kSubPartitions = 4, kSmemUnit = 128, kMaxRegsPerThread = 256;
  if (threads <= 0 || threads > d.max_threads_per_block) return 0;
  const int warps = (threads + d.warp_size - 1) / d.warp_size;
  int blocks = std::min(d.max_blocks_per_sm, d.max_threads_per_sm / d.warp_size / warps);
  if (k.registers > 0) {
    const int per_warp = (k.registers * d.warp_size + kRegUnit - 1) / kRegUnit * kRegUnit;
    const int assumed = per_warp * ((warps + kSubPartitions - 1) / kSubPartitions * kSubPartitions);
    if (k.registers > kMaxRegsPerThread || assumed > d.regs_per_block || per_warp * warps > d.regs_per_block) return 0;
    const int warps_by_regs = d.regs_per_sm / kSubPartitions / per_warp * kSubPartitions;
    blocks = std::min(blocks, warps_by_regs / warps);
  }
  const int64_t smem = k.static_smem + dynamic_smem + d.reserved_smem_per_block;
  const int64_t allocated = (smem + kSmemUnit - 1) / kSmemUnit * kSmemUnit;
  if (allocated > d.smem_per_block_optin + d.reserved_smem_per_block) return 0;
  blocks = static_cast<int>(std::min<int64_t>(blocks, d.smem_per_sm / allocated));
  return std::max(blocks, 0);
}

// A kernel's name as the resource table spells it: the qualified name with its template
// arguments, "grad_ext::cuda::forward_points_kernel<float, 2, 2>" (c++filt of cuobjdump's
// symbol without return type and parameters), from GCC's __PRETTY_FUNCTION__ of a template
// that takes the kernel: "... [with auto Kernel = grad_ext::cuda::f<float, 2, 2>]".
inline std::string kernel_name_from_signature(std::string s) {
  const std::string with = "Kernel = ", gcc_anonymous = "{anonymous}";
  const auto at = s.find(with);
  if (at != std::string::npos) s = s.substr(at + with.size());
  if (!s.empty() && s.back() == ']') s.pop_back();
  const auto more = s.find("; ");  // other parameters or typedefs of the signature
  if (more != std::string::npos) s = s.substr(0, more);
  for (auto p = s.find(gcc_anonymous); p != std::string::npos; p = s.find(gcc_anonymous)) {
    s.replace(p, gcc_anonymous.size(), "(anonymous namespace)");
  }
  return s;
}

}  // namespace cuda
}  // namespace grad_ext
