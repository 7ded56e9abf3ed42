// The scheduler behind emulation.h: launches checked against the device's limits, blocks on
// worker threads, CUDA threads as fibers (ucontext), and the semantics of __syncthreads and the
// warp shuffles with the checks that a GPU does not make (divergent barriers, shuffle masks).
//
// Sanitizers: under AddressSanitizer each switch between stacks is announced
// (__sanitizer_start/finish_switch_fiber). Under ThreadSanitizer each fiber is a thread of its
// own (__tsan_create_fiber) and the switches carry no synchronisation, so the only
// happens-before edges between CUDA threads are the ones CUDA defines: a __syncthreads round
// (each arriving thread releases, each leaving thread acquires, on a per-round address), the
// start of a block (the launch's host work and earlier blocks on the worker) and its end.
#include "cuda/emulation/emulation.h"

#include <c10/util/Exception.h>
#include <stdio.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "cuda/launch_log.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define GRAD_EXT_EMULATION_ASAN 1
#endif
// The ThreadSanitizer build compiles this file without instrumentation (its bookkeeping is
// shared by the scheduler and the threads it switches between) and defines
// GRAD_EXT_EMULATION_TSAN to call the fiber and synchronisation annotations.
#if defined(GRAD_EXT_EMULATION_TSAN)
#include <sanitizer/common_interface_defs.h>
#include <sanitizer/tsan_interface.h>
#endif

namespace grad_ext {
namespace emulation {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread; the kernels' frames take a few KB
constexpr int kWarp = 32;
// CUDA guarantees the alignment that the dynamic shared array is declared with (16 bytes for
// this project's kernels) and the emulation gives exactly that: the buffer starts 16 bytes
// past a 32-byte boundary, so an 8-byte access at offset 4 (mod 8) is misaligned here too.
constexpr size_t kDynamicSharedAlignment = 16;

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone, kFailed };

// One CUDA thread's context. Slots (stack, sanitizer fiber) are kept for later launches.
struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // kStackBytes, above a guard page
  void* tsan = nullptr;
  void* asan_fake_stack = nullptr;
  bool dirty = false;   // left inside the kernel by a failed block
  char start_sync = 0;  // its address orders the block's set-up before the thread's start
  // per block
  uint3 index{};
  int linear = 0;
  State state = State::kReady;
  Site site{};
  uint64_t barriers = 0;  // __syncthreads passed, counted by the thread itself
  // a pending shuffle
  Shuffle op = Shuffle::kIdx;
  unsigned mask = 0;
  int width = 0, lane_arg = 0;
  uint64_t value = 0;
  uint64_t result = 0;  // written by the scheduler, read by the thread: relaxed atomics
  std::string failure;
};

struct SlotPool {
  std::mutex mutex;
  std::vector<Fiber*> free;
};
// Made when the library loads, before any worker exists (a function-local static's guard would
// be invisible to ThreadSanitizer in this uninstrumented file); never destroyed.
SlotPool* const the_slot_pool = new SlotPool();
SlotPool& slot_pool() { return *the_slot_pool; }

Fiber* take_slot() {
  {
    std::lock_guard<std::mutex> lock(slot_pool().mutex);
    if (!slot_pool().free.empty()) {
      Fiber* f = slot_pool().free.back();
      slot_pool().free.pop_back();
      return f;
    }
  }
  auto* f = new Fiber();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* region =
      mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(region != MAP_FAILED, "CUDA emulation: cannot map a thread stack");
  mprotect(region, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
  f->stack = static_cast<char*>(region) + page;
  return f;
}

void return_slot(Fiber* f) {
  if (f->dirty) {  // abandoned inside the kernel: its stack and sanitizer state are stale
#if defined(GRAD_EXT_EMULATION_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(f->stack, kStackBytes);
#endif
#if defined(GRAD_EXT_EMULATION_TSAN)
    if (f->tsan != nullptr) __tsan_destroy_fiber(f->tsan);
    f->tsan = nullptr;
#endif
    f->asan_fake_stack = nullptr;
    f->dirty = false;
  }
  std::lock_guard<std::mutex> lock(slot_pool().mutex);
  slot_pool().free.push_back(f);
}

struct Group {  // the lanes of a warp waiting in one shuffle
  unsigned mask = 0;
  std::vector<int> lanes;
};

struct Block {
  const Launch* launch = nullptr;
  const std::function<void()>* body = nullptr;
  uint3 index{};
  std::vector<Fiber*> fibers;  // by linear thread index
  int threads = 0;
  unsigned char* smem_allocation = nullptr;
  unsigned char* smem = nullptr;
  std::deque<int> ready;
  int exited = 0, first_exited = -1;
  std::vector<int> at_barrier;
  char barrier_sync[2] = {0, 0};
  std::vector<std::vector<Group>> warps;
  std::string error;
};

struct Worker {
  ucontext_t scheduler{};  // no uc_stack: AddressSanitizer's swapcontext leaves that stack's shadow alone
  void* tsan_scheduler = nullptr;
  const void* asan_scheduler_bottom = nullptr;
  size_t asan_scheduler_size = 0;
  Block* block = nullptr;
  Fiber* current = nullptr;
  std::mt19937_64 rng;
  Order order = Order::kAscending;
};

thread_local Worker* tls_worker = nullptr;

std::mutex settings_mutex;
Settings current_settings;
std::map<std::string, int64_t> dynamic_smem_limits;  // cudaFuncAttributeMaxDynamicSharedMemorySize

std::string where(const Site& s) { return std::string(s.file) + ":" + std::to_string(s.line); }
bool same_site(const Site& a, const Site& b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

std::string describe(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}
std::string describe(const uint3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// Threads by index ranges: "0-31, 64".
std::string ranges(std::vector<int> ids) {
  std::sort(ids.begin(), ids.end());
  std::ostringstream out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    out << (i ? ", " : "") << ids[i];
    if (j > i) out << "-" << ids[j];
    i = j + 1;
  }
  return out.str();
}

Worker& running(const char* what) {
  Worker* w = tls_worker;
  TORCH_CHECK(w != nullptr && w->current != nullptr, "CUDA emulation: ", what, " called outside an emulated kernel");
  return *w;
}

// ---- switching between the scheduler and a thread --------------------------------------------

void enter(Worker& w, Fiber& f) {
  w.current = &f;
#if defined(GRAD_EXT_EMULATION_TSAN)
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(GRAD_EXT_EMULATION_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  swapcontext(&w.scheduler, &f.context);
#if defined(GRAD_EXT_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  w.current = nullptr;
}

// The thread gives the worker back to the scheduler; `final` when it never resumes.
void leave(Worker& w, Fiber& f, bool final) {
#if defined(GRAD_EXT_EMULATION_TSAN)
  // Synchronising towards the scheduler orders this thread before the scheduler's bookkeeping
  // and later blocks; the scheduler never passes its own clock on to a thread mid-block.
  __tsan_switch_to_fiber(w.tsan_scheduler, 0);
#endif
#if defined(GRAD_EXT_EMULATION_ASAN)
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake_stack, w.asan_scheduler_bottom, w.asan_scheduler_size);
#endif
  swapcontext(&f.context, &w.scheduler);
#if defined(GRAD_EXT_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, nullptr, nullptr);
#endif
}

void thread_main() {
  Worker& w = *tls_worker;
  Fiber& f = *w.current;
#if defined(GRAD_EXT_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.asan_scheduler_bottom, &w.asan_scheduler_size);
#endif
#if defined(GRAD_EXT_EMULATION_TSAN)
  __tsan_acquire(&f.start_sync);
#endif
  (*w.block->body)();
  f.state = State::kDone;
  leave(w, f, true);
  __builtin_unreachable();
}

// ---- the block's scheduler ---------------------------------------------------------------------

void release(Worker& w, Block& b, std::vector<int> ids) {
  if (w.order == Order::kDescending) std::reverse(ids.begin(), ids.end());
  if (w.order == Order::kRandom) std::shuffle(ids.begin(), ids.end(), w.rng);
  for (int i : ids) {
    b.fibers[i]->state = State::kReady;
    b.ready.push_back(i);
  }
}

std::string block_label(const Block& b) {
  return "kernel " + b.launch->kernel + ", block " + describe(b.index) + " of grid " + describe(b.launch->grid) + ", " +
         describe(b.launch->block) + " threads";
}

void fail_block(Block& b, const std::string& what) {
  if (b.error.empty()) b.error = "CUDA emulation: " + block_label(b) + ": " + what;
}

void arrive_barrier(Worker& w, Block& b, Fiber& f) {
  if (b.exited > 0) {
    fail_block(b, "thread " + std::to_string(f.linear) + " reached __syncthreads at " + where(f.site) +
                      " after thread " + std::to_string(b.first_exited) +
                      " had returned (a barrier that not every thread of the block reaches)");
    return;
  }
  if (!b.at_barrier.empty()) {
    const Fiber& first = *b.fibers[b.at_barrier.front()];
    if (!same_site(first.site, f.site)) {
      fail_block(b, "divergent __syncthreads: thread " + std::to_string(first.linear) + " waits at " +
                        where(first.site) + ", thread " + std::to_string(f.linear) + " at " + where(f.site));
      return;
    }
  }
  b.at_barrier.push_back(f.linear);
  if (static_cast<int>(b.at_barrier.size()) == b.threads) {
    std::vector<int> all;
    all.swap(b.at_barrier);
    std::sort(all.begin(), all.end());
    release(w, b, all);
  }
}

// Source lane of `lane` in a shuffle, by PTX's shfl.sync rules (c = ((32 - width) << 8) | clamp,
// clamp 0 for up and 31 otherwise); -1 when the lane keeps its own value.
int source_lane(Shuffle op, int lane, int b, int width) {
  const int segment = (kWarp - width) & 31;  // the bits of the lane that select its segment
  const int clamp = op == Shuffle::kUp ? 0 : 31;
  const int max_lane = (lane & segment) | (clamp & ~segment);
  const int min_lane = lane & segment;
  b &= 31;
  int j = lane;
  bool inside = false;
  switch (op) {
    case Shuffle::kUp:
      j = lane - b;
      inside = j >= max_lane;
      break;
    case Shuffle::kDown:
      j = lane + b;
      inside = j <= max_lane;
      break;
    case Shuffle::kXor:
      j = lane ^ b;
      inside = j <= max_lane;
      break;
    case Shuffle::kIdx:
      j = min_lane | (b & ~segment);
      inside = j <= max_lane;
      break;
  }
  return inside ? j : -1;
}

const char* shuffle_name(Shuffle op) {
  switch (op) {
    case Shuffle::kIdx:
      return "__shfl_sync";
    case Shuffle::kUp:
      return "__shfl_up_sync";
    case Shuffle::kDown:
      return "__shfl_down_sync";
    case Shuffle::kXor:
      return "__shfl_xor_sync";
  }
  return "?";
}

std::string hex(unsigned mask) {
  std::ostringstream out;
  out << "0x" << std::hex << mask;
  return out.str();
}

void arrive_warp(Worker& w, Block& b, Fiber& f) {
  const int warp = f.linear / kWarp, lane = f.linear % kWarp;
  const std::string call = std::string(shuffle_name(f.op)) + " at " + where(f.site);
  if (!(f.mask >> lane & 1u)) {
    fail_block(b, "thread " + std::to_string(f.linear) + " (lane " + std::to_string(lane) + ") calls " + call +
                      " with mask " + hex(f.mask) + ", which leaves out its own lane");
    return;
  }
  if (f.width < 1 || f.width > kWarp || (f.width & (f.width - 1)) != 0) {
    fail_block(b, call + " with width " + std::to_string(f.width) + ": it must be a power of 2 up to 32");
    return;
  }
  const int lanes_in_block = std::min(kWarp, b.threads - warp * kWarp);
  if (lanes_in_block < kWarp && (f.mask >> lanes_in_block) != 0) {
    fail_block(b, call + " with mask " + hex(f.mask) + " in warp " + std::to_string(warp) + ", which has only " +
                      std::to_string(lanes_in_block) + " threads");
    return;
  }
  auto& groups = b.warps[warp];
  Group* group = nullptr;
  for (auto& g : groups) {
    if (g.mask == f.mask) {
      group = &g;
    } else if (g.mask & f.mask) {
      fail_block(b, "warp " + std::to_string(warp) + ": lane " + std::to_string(lane) + " calls " + call +
                        " with mask " + hex(f.mask) + " while lanes " + ranges(g.lanes) + " wait with mask " +
                        hex(g.mask));
      return;
    }
  }
  if (group == nullptr) {
    groups.push_back(Group{f.mask, {}});
    group = &groups.back();
  } else {
    const Fiber& first = *b.fibers[warp * kWarp + group->lanes.front()];
    if (!same_site(first.site, f.site) || first.op != f.op || first.width != f.width) {
      fail_block(b, "warp " + std::to_string(warp) + ": lane " + std::to_string(lane) + " calls " + call + " (width " +
                        std::to_string(f.width) + ") while lane " + std::to_string(first.linear % kWarp) +
                        " waits in " + shuffle_name(first.op) + " at " + where(first.site) + " (width " +
                        std::to_string(first.width) + ") with the same mask");
      return;
    }
  }
  group->lanes.push_back(lane);
  if (static_cast<int>(group->lanes.size()) < __builtin_popcount(f.mask)) return;
  std::vector<int> ids;
  for (int l : group->lanes) {
    Fiber& t = *b.fibers[warp * kWarp + l];
    const int j = source_lane(t.op, l, t.lane_arg, t.width);
    if (j >= 0 && !(t.mask >> j & 1u)) {
      fail_block(b, call + ": lane " + std::to_string(l) + " reads lane " + std::to_string(j) +
                        ", which is not in the mask " + hex(t.mask) + " (its value is undefined)");
      return;
    }
    const uint64_t v = j >= 0 ? b.fibers[warp * kWarp + j]->value : t.value;
    __atomic_store_n(&t.result, v, __ATOMIC_RELAXED);
    ids.push_back(warp * kWarp + l);
  }
  groups.erase(groups.begin() + (group - groups.data()));
  std::sort(ids.begin(), ids.end());
  release(w, b, ids);
}

void thread_returned(Block& b, Fiber& f) {
  if (b.exited++ == 0) b.first_exited = f.linear;
  if (!b.at_barrier.empty()) {
    const Fiber& waiting = *b.fibers[b.at_barrier.front()];
    fail_block(b, "thread " + std::to_string(f.linear) + " returned while threads " + ranges(b.at_barrier) +
                      " wait at __syncthreads at " + where(waiting.site) +
                      " (a barrier that not every thread of the block reaches)");
  }
}

std::string deadlock(const Block& b) {
  std::ostringstream out;
  out << "no thread can go on (a deadlock):";
  if (!b.at_barrier.empty()) {
    out << " threads " << ranges(b.at_barrier) << " wait at __syncthreads at "
        << where(b.fibers[b.at_barrier.front()]->site) << ";";
  }
  for (size_t warp = 0; warp < b.warps.size(); ++warp) {
    for (const auto& g : b.warps[warp]) {
      const Fiber& first = *b.fibers[warp * kWarp + g.lanes.front()];
      out << " warp " << warp << " lanes " << ranges(g.lanes) << " wait in " << shuffle_name(first.op) << " at "
          << where(first.site) << " for the other lanes of mask " << hex(g.mask) << ";";
    }
  }
  if (b.exited > 0) out << " " << b.exited << " threads have returned";
  return out.str();
}

void run_block(Worker& w, Block& b) {
  const dim3 dims = b.launch->block;
  // Dynamic shared memory: a fresh buffer, filled with 0xff bytes (NaN in every float type),
  // so that a read of what no thread wrote shows in the results.
  const int64_t smem_bytes = b.launch->dynamic_smem;
  void* allocation = nullptr;
  TORCH_CHECK(posix_memalign(&allocation, 2 * kDynamicSharedAlignment, smem_bytes + kDynamicSharedAlignment) == 0,
              "CUDA emulation: cannot allocate ", smem_bytes, " bytes of shared memory");
  b.smem_allocation = static_cast<unsigned char*>(allocation);
  b.smem = b.smem_allocation + kDynamicSharedAlignment;
  std::memset(b.smem, 0xff, smem_bytes);
#if defined(GRAD_EXT_EMULATION_ASAN)
  ASAN_POISON_MEMORY_REGION(b.smem_allocation, kDynamicSharedAlignment);
#endif
  b.warps.assign((b.threads + kWarp - 1) / kWarp, {});
  std::vector<int> all(b.threads);
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = *b.fibers[i];
    f.linear = i;
    f.index = uint3{static_cast<unsigned>(i % dims.x), static_cast<unsigned>(i / dims.x % dims.y),
                    static_cast<unsigned>(i / (dims.x * dims.y))};
    f.state = State::kReady;
    f.barriers = 0;
    f.failure.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, thread_main, 0);
#if defined(GRAD_EXT_EMULATION_TSAN)
    if (f.tsan == nullptr) f.tsan = __tsan_create_fiber(0);
    __tsan_release(&f.start_sync);
#endif
    all[i] = i;
  }
  release(w, b, all);
  while (b.error.empty()) {
    if (b.ready.empty()) {
      if (b.exited < b.threads) fail_block(b, deadlock(b));
      break;
    }
    Fiber& f = *b.fibers[b.ready.front()];
    b.ready.pop_front();
    enter(w, f);
    switch (f.state) {
      case State::kDone:
        thread_returned(b, f);
        break;
      case State::kBarrier:
        arrive_barrier(w, b, f);
        break;
      case State::kWarp:
        arrive_warp(w, b, f);
        break;
      case State::kFailed:
        fail_block(b, "thread " + std::to_string(f.linear) + ": " + f.failure);
        break;
      case State::kReady:
        fail_block(b, "internal error: a thread came back without waiting");
        break;
    }
  }
  for (Fiber* f : b.fibers) {
    if (f->state != State::kDone) f->dirty = true;
  }
  if (!b.error.empty()) return;  // threads left inside the kernel may still point into the buffer
#if defined(GRAD_EXT_EMULATION_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(b.smem_allocation, kDynamicSharedAlignment);
#endif
  free(b.smem_allocation);
}

struct LaunchState {
  std::mutex mutex;
  std::string error;  // the first failure of any worker
  std::atomic<bool> failed{false};
};

void run_worker(const Launch& launch, const std::function<void()>& body, std::vector<int64_t> blocks, const Settings& s,
                int worker_index, LaunchState& state) {
  Worker w;
  w.order = s.order;
  w.rng.seed(s.seed * 1000003u + static_cast<uint64_t>(worker_index));
  if (s.order == Order::kDescending) std::reverse(blocks.begin(), blocks.end());
  if (s.order == Order::kRandom) std::shuffle(blocks.begin(), blocks.end(), w.rng);
#if defined(GRAD_EXT_EMULATION_TSAN)
  w.tsan_scheduler = __tsan_get_current_fiber();
#endif
  tls_worker = &w;
  const int threads = static_cast<int>(launch.block.x * launch.block.y * launch.block.z);
  std::vector<Fiber*> fibers(threads);
  for (auto& f : fibers) f = take_slot();
  const dim3 grid = launch.grid;
  for (int64_t linear : blocks) {
    if (state.failed.load()) break;
    Block b;
    b.launch = &launch;
    b.body = &body;
    b.index = uint3{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                    static_cast<unsigned>(linear / (static_cast<int64_t>(grid.x) * grid.y))};
    b.fibers = fibers;
    b.threads = threads;
    w.block = &b;
    try {
      run_block(w, b);
    } catch (const std::exception& e) {
      fail_block(b, e.what());
    }
    if (!b.error.empty()) {
      std::lock_guard<std::mutex> lock(state.mutex);
      if (state.error.empty()) state.error = b.error;
      state.failed = true;
    }
  }
  w.block = nullptr;
  tls_worker = nullptr;
  for (Fiber* f : fibers) return_slot(f);
}

void check_launch(const Launch& l, const cuda::DeviceLimits& d, int64_t smem_limit, int blocks_per_sm) {
  const std::string name = "CUDA emulation: launch of " + l.kernel + " with grid " + describe(l.grid) + ", block " +
                           describe(l.block) + ", " + std::to_string(l.dynamic_smem) +
                           " bytes of dynamic shared memory";
  const int64_t grid[3] = {l.grid.x, l.grid.y, l.grid.z};
  const int64_t block[3] = {l.block.x, l.block.y, l.block.z};
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(grid[a] >= 1 && grid[a] <= d.max_grid[a], name, ": grid dimension ", a, " must be 1 to ", d.max_grid[a],
                " on ", d.name, " (cudaErrorInvalidValue)");
    TORCH_CHECK(block[a] >= 1 && block[a] <= d.max_block[a], name, ": block dimension ", a, " must be 1 to ",
                d.max_block[a], " on ", d.name, " (cudaErrorInvalidValue)");
  }
  TORCH_CHECK(block[0] * block[1] * block[2] <= d.max_threads_per_block, name, ": more than ", d.max_threads_per_block,
              " threads in a block (cudaErrorInvalidValue)");
  TORCH_CHECK(l.dynamic_smem >= 0 && l.dynamic_smem <= smem_limit, name, ": the kernel may use at most ", smem_limit,
              " bytes of dynamic shared memory on ", d.name,
              " (cudaFuncAttributeMaxDynamicSharedMemorySize; cudaErrorInvalidValue)");
  TORCH_CHECK(blocks_per_sm >= 1, name, ": one block does not fit a multiprocessor of ", d.name, " (",
              l.resources.registers, " registers per thread, ", l.resources.static_smem,
              " bytes of static shared memory; cudaErrorLaunchOutOfResources)");
}

// A sanitizer's report ends the process: say which emulated thread made it.
void report_emulated_thread() {
  const Worker* w = tls_worker;
  if (w == nullptr || w->block == nullptr) return;
  const Block& b = *w->block;
  std::string where = "CUDA emulation: the report above comes from " + block_label(b);
  if (w->current != nullptr) where += ", thread " + describe(w->current->index);
  const char* test = getenv("PYTEST_CURRENT_TEST");  // set by pytest while a test runs
  if (test != nullptr) where += " (test " + std::string(test) + ")";
  fprintf(stderr, "%s\n", where.c_str());
}

#if defined(__SANITIZE_ADDRESS__) || defined(GRAD_EXT_EMULATION_TSAN)
const bool death_callback_set = [] {
  __sanitizer_set_death_callback(report_emulated_thread);
  return true;
}();
#endif

}  // namespace

const uint3& thread_index() { return running("threadIdx").current->index; }
const uint3& block_index() { return running("blockIdx").block->index; }
const dim3& block_dim() { return running("blockDim").block->launch->block; }
const dim3& grid_dim() { return running("gridDim").block->launch->grid; }
unsigned char* dynamic_shared() { return running("dynamic shared memory").block->smem; }

void syncthreads(Site site) {
  Worker& w = running("__syncthreads");
  Fiber& f = *w.current;
  Block& b = *w.block;
  f.state = State::kBarrier;
  f.site = site;
#if defined(GRAD_EXT_EMULATION_TSAN)
  __tsan_release(&b.barrier_sync[f.barriers & 1]);
#endif
  leave(w, f, false);
#if defined(GRAD_EXT_EMULATION_TSAN)
  __tsan_acquire(&b.barrier_sync[f.barriers & 1]);
#endif
  ++f.barriers;
}

uint64_t shuffle_bits(Shuffle op, Site site, unsigned mask, uint64_t bits, int lane_arg, int width) {
  Worker& w = running(shuffle_name(op));
  Fiber& f = *w.current;
  f.state = State::kWarp;
  f.site = site;
  f.op = op;
  f.mask = mask;
  f.width = width;
  f.lane_arg = lane_arg;
  f.value = bits;
  leave(w, f, false);
  return __atomic_load_n(&f.result, __ATOMIC_RELAXED);
}

void fail(const std::string& what) {
  Worker* w = tls_worker;
  if (w == nullptr || w->current == nullptr) TORCH_CHECK(false, "CUDA emulation: ", what);
  Fiber& f = *w->current;
  f.failure = what;
  f.state = State::kFailed;
  leave(*w, f, false);  // never resumed: the block has failed
  std::abort();
}

Settings settings() {
  std::lock_guard<std::mutex> lock(settings_mutex);
  return current_settings;
}

void configure(const Settings& s) {
  TORCH_CHECK(s.device != nullptr, "CUDA emulation: no device table");
  TORCH_CHECK(s.workers >= 1 && s.workers <= 64, "CUDA emulation: workers must be 1 to 64, got ", s.workers);
  std::lock_guard<std::mutex> lock(settings_mutex);
  current_settings = s;
}

void set_max_dynamic_smem(const std::string& kernel, int64_t bytes) {
  const Settings s = settings();
  TORCH_CHECK(bytes >= 0 && bytes <= s.device->smem_per_block_optin, "CUDA emulation: cudaFuncSetAttribute(", kernel,
              ", MaxDynamicSharedMemorySize, ", bytes, "): at most ", s.device->smem_per_block_optin, " on ",
              s.device->name, " (cudaErrorInvalidValue)");
  std::lock_guard<std::mutex> lock(settings_mutex);
  dynamic_smem_limits[kernel] = bytes;
}

void run(const Launch& launch, const std::function<void()>& body) {
  const Settings s = settings();
  const cuda::DeviceLimits& d = *s.device;
  int64_t smem_limit = d.smem_per_block - launch.resources.static_smem;
  {
    std::lock_guard<std::mutex> lock(settings_mutex);
    const auto it = dynamic_smem_limits.find(launch.kernel);
    if (it != dynamic_smem_limits.end()) smem_limit = it->second;
  }
  smem_limit = std::min(smem_limit, d.smem_per_block_optin - launch.resources.static_smem);
  const int threads = static_cast<int>(launch.block.x * launch.block.y * launch.block.z);
  const int blocks_per_sm = cuda::occupancy(d, launch.resources, threads, launch.dynamic_smem);
  check_launch(launch, d, smem_limit, blocks_per_sm);
  cuda::log_launch(cuda::LaunchRecord{launch.kernel,
                                      {launch.grid.x, launch.grid.y, launch.grid.z},
                                      {launch.block.x, launch.block.y, launch.block.z},
                                      launch.dynamic_smem,
                                      launch.resources,
                                      blocks_per_sm,
                                      blocks_per_sm,
                                      d.name,
                                      s.execute});
  if (!s.execute) return;
  const int64_t total = static_cast<int64_t>(launch.grid.x) * launch.grid.y * launch.grid.z;
  const int workers = static_cast<int>(std::min<int64_t>(s.workers, total));
  std::vector<std::vector<int64_t>> assigned(workers);
  for (int64_t i = 0; i < total; ++i) assigned[i % workers].push_back(i);
  LaunchState state;
  std::vector<std::thread> pool;
  for (int k = 0; k < workers; ++k) {
    pool.emplace_back(run_worker, std::cref(launch), std::cref(body), std::move(assigned[k]), std::cref(s), k,
                      std::ref(state));
  }
  for (auto& t : pool) t.join();
  TORCH_CHECK(!state.failed.load(), state.error);
}

}  // namespace emulation
}  // namespace grad_ext
