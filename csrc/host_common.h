// Host helpers shared by every launcher (CPU and CUDA, sample_grid and refine).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace grad_ext {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Calls f(std::integral_constant<int, D>{}) for the table dimension D = 1..4.
template <typename F>
void dispatch_dim(int D, F&& f) {
  switch (D) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    default:
      TORCH_CHECK_VALUE(false, "grad_ext: table dimension must be 1 to 4, got ", D);
  }
}

// Which kernels serve a call: the CPU ones, or the CUDA ones (on a GPU, or emulated on the CPU).
enum class Backend { kCpu, kCuda };

inline const char* backend_name(Backend b) { return b == Backend::kCuda ? "cuda" : "cpu"; }

// The dtypes each backend's kernels take. float16/bfloat16 on the CPU only where the op says so
// (sample_grid computes them in float32; refine does not take them there).
inline bool supported_dtype(at::ScalarType s, Backend backend, bool reduced_on_cpu) {
  if (s == at::kFloat || s == at::kDouble) return true;
  return (backend == Backend::kCuda || reduced_on_cpu) && (s == at::kHalf || s == at::kBFloat16);
}

inline const char* supported_dtypes(Backend backend, bool reduced_on_cpu) {
  return backend == Backend::kCuda || reduced_on_cpu ? "float32, float64, float16 or bfloat16" : "float32 or float64";
}

inline void check_supported_dtype(const char* op, const char* name, const at::Tensor& t, Backend backend,
                                  bool reduced_on_cpu = false) {
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type(), backend, reduced_on_cpu), op, ": ", name, " dtype ",
                   t.scalar_type(), " is not supported on ", backend_name(backend), "; use ",
                   supported_dtypes(backend, reduced_on_cpu));
}

}  // namespace grad_ext
