// Loads libgrad_ext_ops at run time (as torch.ops.load_library does), then samples a grid
// through the dispatcher and compares with at::grid_sampler. Exit code 0 when they agree.
//   grad_ext_cpp_demo <path to libgrad_ext_ops.so>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " <libgrad_ext_ops.so>\n";
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 2;
  }
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("grad_ext::sample_grid", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, double, double, int64_t,
                                  const std::optional<at::Tensor>&)>();
  at::manual_seed(0);
  const at::Tensor table = at::randn({1, 8, 6, 6});
  const at::Tensor grid = at::rand({3, 5, 5, 2}) * 2 - 1;
  const at::Tensor out = op.call(table, grid, 0, 0, false, 0.0, 0.0, 0, std::nullopt);
  const at::Tensor ref = at::grid_sampler(table.expand({3, 8, 6, 6}), grid, 0, 0, false);
  const double err = (out - ref).abs().max().item<double>();
  std::cout << "grad_ext::sample_grid from C++: output " << out.sizes() << ", max |diff| vs at::grid_sampler = " << err
            << "\n";
  return err < 1e-5 ? 0 : 1;
}
