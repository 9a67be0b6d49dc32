// The one place the resnet_fused operators are declared. Kernels register
// against these schemas per dispatch key in csrc/cpu and csrc/cuda; fake
// (meta) implementations live in resnet_fused/ops/extension.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing resnet_fused._C loads this library, which runs the TORCH_LIBRARY
// registrations below; the Python module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resnet_fused, m) {
  // Inference epilogue, in place on a convolution's output y:
  //   y = act(y * scale[c] + shift[c] + residual)
  // scale and shift are fp32 per-channel vectors; the math runs in fp32
  // (fp64 for double y) and rounds once at the store. It returns nothing:
  // torch.compile can functionalize a custom op that mutates an input only
  // when the op does not also return an alias of it.
  m.def(
      "scale_shift_add_relu_(Tensor(a!) y, Tensor scale, Tensor shift, "
      "Tensor? residual, bool relu) -> ()");
}
