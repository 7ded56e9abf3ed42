// A record of the kernel launches a process makes, off unless asked for: which kernel ran with
// what grid, block and shared memory, and how many of its blocks fit a multiprocessor. The GPU
// build records the CUDA runtime's occupancy beside the model of device_limits.h (a check of
// the model); the emulation records the model's. Python reads it through the op
// `cuda_launch_log(bool enable) -> str` (JSON, the launches since the last call;
// cuda/introspection.cu).
#pragma once
#include <cstdint>
#include <string>

#include "cuda/device_limits.h"

namespace grad_ext {
namespace cuda {

struct LaunchRecord {
  std::string kernel;
  int64_t grid[3];
  int64_t block[3];
  int64_t dynamic_smem;
  KernelResources resources;
  int blocks_per_sm;        // the CUDA runtime's on a GPU, the model's in the emulation
  int model_blocks_per_sm;  // device_limits.h's occupancy from kernel_resources.h; -1 if unknown
  std::string device;
  bool executed;  // false in the emulation's dry runs
};

bool launch_log_enabled();
void log_launch(const LaunchRecord& r);  // a no-op unless enabled

}  // namespace cuda
}  // namespace grad_ext
