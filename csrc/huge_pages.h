// Outputs of many megabytes on the CPU: the kernels are the first to write them, and with 4 KiB
// pages that first touch (one page fault and one page clear per page) can cost several times
// the kernel itself. On Linux, advising transparent huge pages for the allocation makes it one
// fault per 2 MiB. Opt in with the environment variable GRAD_EXT_HUGE_PAGES=1: on virtual
// machines that hand freed memory back to their host, every fresh huge page is a slow host
// fault, and the advice makes things slower, not faster. The advice is best effort (ignored
// where THP is off).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace grad_ext {

constexpr uintptr_t kHugePageBytes = uintptr_t(2) << 20;
constexpr int64_t kHugePageMinBytes = 4 * static_cast<int64_t>(kHugePageBytes);

// Read at every large allocation (cheap next to touching megabytes), so it can be changed at run time.
inline bool huge_pages_enabled() {
  const char* env = std::getenv("GRAD_EXT_HUGE_PAGES");
  const std::string value = env ? env : "0";
  TORCH_CHECK(value == "0" || value == "1", "GRAD_EXT_HUGE_PAGES must be '0' or '1', got '", value, "'");
  return value == "1";
}

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (!t.is_cpu() || bytes < kHugePageMinBytes || !huge_pages_enabled()) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHugePageBytes - 1);
  // Only whole huge pages inside the allocation; a failure leaves ordinary pages.
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty / at::zeros for kernel outputs, with the advice above.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options).zero_();
}

}  // namespace grad_ext
