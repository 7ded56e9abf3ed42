// The op library of the CUDA emulation, libgrad_ext_emulated.so: grad_ext's kernel ops under
// the namespace grad_ext_emulated, whose CPU kernels are csrc/cuda's launchers and kernels run
// by the emulation (they register themselves, cuda/runtime.h), and the emulation's controls:
//
//   configure(device, workers, order, seed, execute)  the device table ('h100', 'h200'), worker
//       threads, the order of blocks and threads ('ascending', 'descending', 'random'), the
//       seed of 'random', and whether launches run or are only checked and logged
//   info() -> str                     JSON: the sanitizers this build has, the settings
//   selftest(name) -> Tensor          runs one of selftest.cpp's kernels
// and, as in the GPU build (cuda/introspection.cu), cuda_launch_log and cuda_device_limits.
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cuda/emulation/emulation.h"
#include "cuda/emulation/selftest.h"
#include "op_schemas.h"

namespace grad_ext {
namespace emulation {
namespace {

const char* sanitizers() {
#if defined(GRAD_EXT_EMULATION_TSAN)
  return "thread";
#elif defined(__SANITIZE_ADDRESS__)
  return "address,undefined";
#else
  return "";
#endif
}

const char* order_name(Order o) {
  switch (o) {
    case Order::kAscending:
      return "ascending";
    case Order::kDescending:
      return "descending";
    case Order::kRandom:
      return "random";
  }
  return "?";
}

const cuda::DeviceLimits& device_by_name(const std::string& name) {
  const cuda::DeviceLimits* d = cuda::device_table(name);
  TORCH_CHECK_VALUE(d != nullptr, "CUDA emulation: device must be 'h100' or 'h200', got '", name, "'");
  return *d;
}

void configure_op(const std::string& device, int64_t workers, const std::string& order, int64_t seed, bool execute) {
  Settings s;
  s.device = &device_by_name(device);
  TORCH_CHECK_VALUE(workers >= 1 && workers <= 64, "CUDA emulation: workers must be 1 to 64, got ", workers);
  s.workers = static_cast<int>(workers);
  if (order == "ascending") {
    s.order = Order::kAscending;
  } else if (order == "descending") {
    s.order = Order::kDescending;
  } else if (order == "random") {
    s.order = Order::kRandom;
  } else {
    TORCH_CHECK_VALUE(false, "CUDA emulation: order must be 'ascending', 'descending' or 'random', got '", order, "'");
  }
  s.seed = static_cast<uint64_t>(seed);
  s.execute = execute;
  configure(s);
}

std::string info_op() {
  const Settings s = settings();
  std::ostringstream out;
  out << "{\"sanitizers\": \"" << sanitizers() << "\", \"device\": \"" << s.device->name
      << "\", \"workers\": " << s.workers << ", \"order\": \"" << order_name(s.order) << "\", \"seed\": " << s.seed
      << ", \"execute\": " << (s.execute ? "true" : "false") << "}";
  return out.str();
}

}  // namespace

TORCH_LIBRARY(grad_ext_emulated, m) {
  define_kernel_ops(m);
  m.def("configure(str device, int workers, str order, int seed, bool execute) -> ()", &configure_op);
  m.def("info() -> str", &info_op);
  m.def("selftest(str name) -> Tensor", &run_selftest);
}

}  // namespace emulation
}  // namespace grad_ext
