// What the CUDA backend tells of itself, as ops in the GPU build's grad_ext namespace or the
// emulation's grad_ext_emulated (cuda/runtime.h picks):
//   cuda_launch_log(bool enable) -> str   the launches since the last call (launch_log.h), JSON
//   cuda_device_limits(str device) -> str the limits of 'h100' or 'h200' (device_limits.h's
//       tables) or of the 'current' device (read off the GPU; the emulated device), JSON
#include "cuda/launch_log.h"

#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <sstream>
#include <vector>

#include "cuda/runtime.h"

namespace grad_ext {
namespace cuda {
namespace {

std::atomic<bool> enabled{false};
std::mutex log_mutex;
std::vector<LaunchRecord> records;

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// Enables or disables the log and returns what it holds as a JSON list, emptying it.
std::string cuda_launch_log(bool enable) {
  std::vector<LaunchRecord> taken;
  {
    std::lock_guard<std::mutex> lock(log_mutex);
    taken.swap(records);
    enabled = enable;
  }
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < taken.size(); ++i) {
    const LaunchRecord& r = taken[i];
    out << (i ? ",\n" : "") << "{\"kernel\": " << json_string(r.kernel) << ", \"grid\": [" << r.grid[0] << ", "
        << r.grid[1] << ", " << r.grid[2] << "], \"block\": [" << r.block[0] << ", " << r.block[1] << ", " << r.block[2]
        << "], \"dynamic_smem\": " << r.dynamic_smem << ", \"registers\": " << r.resources.registers
        << ", \"static_smem\": " << r.resources.static_smem << ", \"local_bytes\": " << r.resources.local_bytes
        << ", \"blocks_per_sm\": " << r.blocks_per_sm << ", \"model_blocks_per_sm\": " << r.model_blocks_per_sm
        << ", \"device\": " << json_string(r.device) << ", \"executed\": " << (r.executed ? "true" : "false") << "}";
  }
  out << "]";
  return out.str();
}

std::string device_limits_json(const std::string& device) {
  const DeviceLimits* table = device == "current" ? &device_limits() : device_table(device);
  TORCH_CHECK_VALUE(table != nullptr, "cuda_device_limits: device must be 'h100', 'h200' or 'current', got '", device,
                    "'");
  const DeviceLimits& d = *table;
  std::ostringstream out;
  out << "{\"name\": " << json_string(d.name) << ", \"compute_capability\": [" << d.major << ", " << d.minor
      << "], \"sm_count\": " << d.sm_count << ", \"smem_per_sm\": " << d.smem_per_sm
      << ", \"smem_per_block\": " << d.smem_per_block << ", \"smem_per_block_optin\": " << d.smem_per_block_optin
      << ", \"reserved_smem_per_block\": " << d.reserved_smem_per_block
      << ", \"max_threads_per_block\": " << d.max_threads_per_block
      << ", \"max_threads_per_sm\": " << d.max_threads_per_sm << ", \"max_blocks_per_sm\": " << d.max_blocks_per_sm
      << ", \"regs_per_sm\": " << d.regs_per_sm << ", \"regs_per_block\": " << d.regs_per_block << ", \"max_grid\": ["
      << d.max_grid[0] << ", " << d.max_grid[1] << ", " << d.max_grid[2] << "], \"max_block\": [" << d.max_block[0]
      << ", " << d.max_block[1] << ", " << d.max_block[2] << "], \"warp_size\": " << d.warp_size
      << ", \"memory_bandwidth_gbs\": " << d.memory_bandwidth_gbs
      << ", \"global_memory_bytes\": " << d.global_memory_bytes << "}";
  return out.str();
}

}  // namespace

bool launch_log_enabled() { return enabled.load(std::memory_order_relaxed); }

void log_launch(const LaunchRecord& r) {
  if (!launch_log_enabled()) return;
  std::lock_guard<std::mutex> lock(log_mutex);
  records.push_back(r);
}

TORCH_LIBRARY_FRAGMENT(GRAD_EXT_CUDA_OPS, m) {
  m.def("cuda_launch_log(bool enable) -> str", &cuda_launch_log);
  m.def("cuda_device_limits(str device) -> str", &device_limits_json);
}

}  // namespace cuda
}  // namespace grad_ext
