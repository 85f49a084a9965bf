// The Python module kevlarflow._C. Importing it runs the TORCH_LIBRARY
// registrations; the module itself only reports how it was built.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "KevlarFlow native core: torch.ops.kevlarflow.* kernels";
#ifdef KEVLARFLOW_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
