// Kernels that test the emulation itself (selftest.cpp): its shuffle semantics, the order
// settings, and each check it or a sanitizer makes, one deliberately broken kernel per check.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace grad_ext {
namespace emulation {

// Runs the kernel `name`; its result where it has one (see selftest.cpp for each name).
at::Tensor run_selftest(const std::string& name);

}  // namespace emulation
}  // namespace grad_ext
