// Outputs of many megabytes on the CPU: the kernels are the first to write them, and with 4 KiB
// pages that first touch (one page fault and one page clear per page) can cost several times
// the kernel itself. On Linux, advising transparent huge pages for the allocation makes it one
// fault per 2 MiB. Opt in with the environment variable GRAD_EXT_HUGE_PAGES=1: on virtual
// machines that hand freed memory back to their host, every fresh huge page is a slow host
// fault, and the advice makes things slower, not faster. The advice is best effort (ignored
// where THP is off).
#pragma once
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

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

// Recycled output buffers. A fresh allocation of many megabytes is new pages from the OS, and
// their first touch costs more than many kernels (17 ms for a 43 MB output on a 2-core VM,
// against 2 ms to write it once faulted in). CPU outputs of kCacheMinBytes and more are
// therefore carved from buffers that earlier outputs freed, kept up to GRAD_EXT_OUTPUT_CACHE_MB
// megabytes in all (default 256; 0 turns the cache off). Such a tensor's storage cannot be
// resized in place.
constexpr int64_t kCacheMinBytes = 4 * static_cast<int64_t>(kHugePageBytes);

inline int64_t output_cache_bytes() {
  const char* env = std::getenv("GRAD_EXT_OUTPUT_CACHE_MB");
  if (env == nullptr) return int64_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
              "GRAD_EXT_OUTPUT_CACHE_MB must be a number of megabytes >= 0, got '", env, "'");
  return static_cast<int64_t>(mb) << 20;
}

class OutputCache {
 public:
  // Never destroyed: tensors may be freed after static destructors have run.
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  // A buffer of at least `bytes` (a multiple of kHugePageBytes), reused when one of at most
  // 5/4 of the size is cached.
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t size = free_[i].first;
        if (size >= bytes && size <= bytes / 4 * 5 && (best == free_.size() || size < free_[best].first)) best = i;
      }
      if (best != free_.size()) {
        void* p = free_[best].second;
        cached_ -= free_[best].first;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        return p;
      }
    }
    void* p = std::aligned_alloc(kHugePageBytes, bytes);
    TORCH_CHECK(p != nullptr, "grad_ext: out of memory allocating ", bytes, " bytes");
    return p;
  }

  void release(void* p, size_t bytes) {
    const int64_t cap = output_cache_bytes();
    std::lock_guard<std::mutex> lock(mutex_);
    if (static_cast<int64_t>(cached_ + bytes) > cap) {
      std::free(p);
      return;
    }
    free_.emplace_back(bytes, p);
    cached_ += bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> free_;
  size_t cached_ = 0;
};

// at::empty / at::zeros for kernel outputs: large CPU outputs from the cache, with the advice above.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  const bool cpu = options.device().is_cpu();
  if (!cpu || bytes < kCacheMinBytes || output_cache_bytes() == 0) {
    at::Tensor t = at::empty(sizes, options);
    advise_huge_pages(t);
    return t;
  }
  const size_t size = static_cast<size_t>((bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes);
  void* p = OutputCache::get().acquire(size);
  at::Tensor t = at::from_blob(
      p, sizes, [size](void* q) { OutputCache::get().release(q, size); }, options.memory_format(c10::nullopt));
  advise_huge_pages(t);
  return t;
}

inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options).zero_();
}

}  // namespace grad_ext
