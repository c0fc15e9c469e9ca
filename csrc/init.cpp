// fastseg._C: a Python module whose only job is to load the operator registrations.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef FASTSEG_TORCH_VERSION
#define FASTSEG_TORCH_VERSION "unknown"
#endif

namespace {

// What this binary was compiled against; fastseg._extension compares it with the running torch.
std::string build_info() {
  std::string info = "torch=" FASTSEG_TORCH_VERSION ";cuda=";
#ifdef FASTSEG_WITH_CUDA
  info += "1";
#else
  info += "0";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def("_build_info() -> str", &build_info);
}

static PyModuleDef fastseg_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastseg_module); }
