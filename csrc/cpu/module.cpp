// The Python module llama2_C. It holds no functions: importing it loads this library, whose static
// initializers register the llama2 ops with the dispatcher (torch.ops.llama2.*), as in the PyTorch
// "custom C++ and CUDA operators" tutorial. CPU and CUDA kernels live in the same library.
#include <Python.h>

extern "C" PyObject* PyInit_llama2_C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "llama2_C",                                                         // name
      "llama2 ops (RMSNorm, RoPE, attention), registered as torch.ops.llama2.*",  // doc
      -1,                                                                 // no per-module state
      nullptr,                                                            // no methods
  };
  return PyModule_Create(&module_def);
}
