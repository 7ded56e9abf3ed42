// The grad_ext operator library: the kernel ops of op_schemas.h and two build queries. Kernels
// register their implementations per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd
// and fake (meta) kernels are registered from Python in grad_ext/_ops.py.
#include <torch/library.h>

#include <string>

#include "op_schemas.h"

#ifndef GRAD_EXT_NO_PYTHON
#include <Python.h>
// An empty Python module so that `import grad_ext._C` loads this library and runs the
// static registrations below; the ops are reached through torch.ops.grad_ext.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace grad_ext {

bool compiled_with_cuda() {
#ifdef GRAD_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Defined in cpu/sample_grid.cpp: "avx2" or "baseline", the SIMD build of the CPU loops in use.
std::string cpu_simd();

TORCH_LIBRARY(grad_ext, m) {
  define_kernel_ops(m);
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  m.def("cpu_simd() -> str", &cpu_simd);
}

}  // namespace grad_ext
