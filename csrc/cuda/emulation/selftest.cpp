// Kernels that test the emulation itself; tests/test_cuda_emulation.py runs them. Each broken
// kernel breaks one rule, named after what must catch it:
//   the emulation: divergent_barrier, barrier_after_return, shuffle_without_own_lane,
//       shuffle_from_inactive_lane, shuffle_deadlock, too_many_threads, smem_without_opt_in
//   AddressSanitizer: shared_out_of_bounds, global_out_of_bounds
//   UndefinedBehaviorSanitizer: misaligned_shared
//   ThreadSanitizer: shared_race (a missing __syncthreads), global_race (a plain add for atomicAdd)
// and two correct ones report what the emulation does:
//   shuffles: every shuffle form and width, for the test to compare with CUDA's documented rules
//   order: the order in which blocks and threads first ran, under the current settings
#include "cuda/emulation/selftest.h"

#include <array>
#include <functional>
#include <map>
#include <vector>

#include "cuda/emulation/emulation.h"

namespace grad_ext {
namespace emulation {
namespace {

// The shuffle cases, one row each: op (0 idx, 1 up, 2 down, 3 xor), width, lane argument.
std::vector<std::array<int, 3>> shuffle_cases() {
  std::vector<std::array<int, 3>> cases;
  for (int op = 0; op < 4; ++op)
    for (int width : {32, 16, 8, 4, 2, 1})
      for (int arg : {0, 1, 2, 3, 5, 8, 16, 17, 31}) cases.push_back({op, width, arg});
  return cases;
}

void shuffles_kernel(int64_t* out, const int* cases, int count) {
  const int t = threadIdx.x;
  for (int i = 0; i < count; ++i) {
    const int op = cases[3 * i], width = cases[3 * i + 1], arg = cases[3 * i + 2];
    const int64_t v = 1000 + t;  // 8-byte values: the widest a shuffle moves
    int64_t r = 0;
    if (op == 0) r = __shfl_sync(0xffffffffu, v, arg, width);
    if (op == 1) r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
    if (op == 2) r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
    if (op == 3) r = __shfl_xor_sync(0xffffffffu, v, arg, width);
    out[i * blockDim.x + t] = r;
  }
  // Two half-warp shuffles at once, each with its own mask.
  const unsigned half = (t % 32) < 16 ? 0x0000ffffu : 0xffff0000u;
  out[count * blockDim.x + t] = __shfl_xor_sync(half, static_cast<int64_t>(1000 + t), 1);
}

void order_kernel(int64_t* out, int* counter) {
  // Each thread takes a ticket on arriving; the tickets give the order of the first phase.
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  out[t] = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
  __syncthreads();
}

void divergent_barrier_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

void barrier_after_return_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

void shuffle_without_own_lane_kernel() { (void)__shfl_xor_sync(0xfffffffeu, 1.0f, 1); }

void shuffle_from_inactive_lane_kernel() {
  if (threadIdx.x < 16) (void)__shfl_xor_sync(0x0000ffffu, 1.0f, 16);
}

void shuffle_deadlock_kernel() {
  if (threadIdx.x < 16) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

void empty_kernel() {}

void shared_out_of_bounds_kernel(int bytes) {
  GRAD_EXT_DYNAMIC_SHARED(unsigned char, smem);
  if (threadIdx.x == 0) smem[bytes] = 1;  // one past the end
}

void global_out_of_bounds_kernel(float* out, int64_t n) {
  const int64_t i = threadIdx.x;
  if (i <= n) out[i] = 1.f;  // off by one
}

void misaligned_shared_kernel() {
  GRAD_EXT_DYNAMIC_SHARED(unsigned char, smem);
  if (threadIdx.x == 0) *reinterpret_cast<uint64_t*>(smem + 4) = 1;
}

void shared_race_kernel(float* out) {
  GRAD_EXT_DYNAMIC_SHARED(float, smem);
  const int t = threadIdx.x;
  smem[t] = static_cast<float>(t);
  // the __syncthreads() that belongs here is missing
  out[t] = smem[(t + 1) % blockDim.x];
}

void global_race_kernel(float* out) {
  out[0] += 1.f;  // every thread: needs atomicAdd
}

Launch make_launch(const std::string& kernel, dim3 grid, dim3 block, int64_t smem = 0) {
  return Launch{"selftest::" + kernel, grid, block, smem, cuda::KernelResources{32, 0, 0}};
}

}  // namespace

at::Tensor run_selftest(const std::string& name) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  if (name == "shuffles") {
    const auto cases = shuffle_cases();
    const int count = static_cast<int>(cases.size());
    at::Tensor table = at::empty({count, 3}, at::TensorOptions().dtype(at::kInt));
    for (int i = 0; i < count; ++i)
      for (int k = 0; k < 3; ++k) table[i][k] = cases[i][k];
    at::Tensor out = at::empty({count + 1, 64}, i64);
    int64_t* o = out.data_ptr<int64_t>();
    const int* c = table.data_ptr<int>();
    run(make_launch(name, dim3(1), dim3(64)), [&] { shuffles_kernel(o, c, count); });
    return at::cat({at::cat({table.to(at::kLong), at::zeros({1, 3}, i64)}), out}, 1);
  }
  if (name == "order") {
    at::Tensor out = at::empty({4 * 64}, i64);
    at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
    int64_t* o = out.data_ptr<int64_t>();
    int* n = counter.data_ptr<int>();
    run(make_launch(name, dim3(4), dim3(64)), [&] { order_kernel(o, n); });
    return out;
  }
  const std::map<std::string, std::pair<std::function<void()>, Launch>> plain = {
      {"divergent_barrier", {divergent_barrier_kernel, make_launch(name, dim3(1), dim3(64))}},
      {"barrier_after_return", {barrier_after_return_kernel, make_launch(name, dim3(1), dim3(64))}},
      {"shuffle_without_own_lane", {shuffle_without_own_lane_kernel, make_launch(name, dim3(1), dim3(32))}},
      {"shuffle_from_inactive_lane", {shuffle_from_inactive_lane_kernel, make_launch(name, dim3(1), dim3(32))}},
      {"shuffle_deadlock", {shuffle_deadlock_kernel, make_launch(name, dim3(1), dim3(32))}},
      {"too_many_threads", {empty_kernel, make_launch(name, dim3(1), dim3(2048))}},
      {"smem_without_opt_in", {empty_kernel, make_launch(name, dim3(1), dim3(32), 64 * 1024)}},
      {"misaligned_shared", {misaligned_shared_kernel, make_launch(name, dim3(1), dim3(32), 64)}},
  };
  const auto it = plain.find(name);
  if (it != plain.end()) {
    run(it->second.second, it->second.first);
    return at::empty({0}, f32);
  }
  at::Tensor out = at::zeros({64}, f32);
  float* o = out.data_ptr<float>();
  if (name == "shared_out_of_bounds") {
    run(make_launch(name, dim3(1), dim3(32), 100), [&] { shared_out_of_bounds_kernel(100); });
  } else if (name == "global_out_of_bounds") {
    run(make_launch(name, dim3(1), dim3(128)), [&] { global_out_of_bounds_kernel(o, 64); });
  } else if (name == "shared_race") {
    run(make_launch(name, dim3(1), dim3(64), 64 * sizeof(float)), [&] { shared_race_kernel(o); });
  } else if (name == "global_race") {
    run(make_launch(name, dim3(1), dim3(64)), [&] { global_race_kernel(o); });
  } else {
    TORCH_CHECK_VALUE(false, "CUDA emulation: no self-test named '", name, "'");
  }
  return out;
}

}  // namespace emulation
}  // namespace grad_ext
