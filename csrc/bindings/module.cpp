// The Python module kevlarflow._C. Importing it runs the TORCH_LIBRARY
// registrations; the module itself only reports how it was built.
#include <pybind11/pybind11.h>

#include "paged_attention.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "KevlarFlow native core: torch.ops.kevlarflow.* kernels";
#ifdef KEVLARFLOW_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("cpu_attention_isa", &kevlarflow::paged_attention_cpu_isa,
        "The CPU attention variant in use: 'avx2' or 'generic' (KEVLARFLOW_CPU_ISA=generic "
        "forces the portable one).");
}
