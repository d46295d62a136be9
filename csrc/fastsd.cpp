// fastsd._C: the library of C++ (CPU) and CUDA kernels behind fastsd's "cpp" and "cuda" backends.
//
// Ops live in the `fastsd_C` namespace (torch.ops.fastsd_C.<op>). Each op declares its schema in
// csrc/<op>.cpp with TORCH_LIBRARY_FRAGMENT and registers kernels in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu with TORCH_LIBRARY_IMPL (the torchvision layout). The differentiable public
// ops are the Python torch.library ops in the `fastsd` namespace, which call these.
#ifndef Py_LIMITED_API  // torch >= 2.6 defines it for py_limited_api extensions; older ones do not
#define Py_LIMITED_API 0x03090000
#endif
#include <Python.h>
#include <torch/library.h>

namespace fastsd {

bool built_with_cuda() {
#ifdef FASTSD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace fastsd

TORCH_LIBRARY(fastsd_C, m) {
  m.def("built_with_cuda() -> bool", &fastsd::built_with_cuda);
}

// `import fastsd._C` loads this library (running the registrations above); there is no Python API.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
