# Locate the torch that the build's Python has installed and decide whether the
# CUDA implementations are built. The decision follows torch.version.cuda: a
# CUDA torch gets CUDA kernels, a CPU torch never does, whatever nvcc is around.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _torch_info
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "kevlarflow is built against an installed torch, and '${Python_EXECUTABLE}' "
    "cannot import torch. Install torch first, then build with "
    "'pip install --no-build-isolation .'")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 KEVLARFLOW_TORCH_CMAKE_PREFIX)
list(GET _torch_info 1 KEVLARFLOW_TORCH_VERSION)
string(REGEX MATCH "^[0-9]+\\.[0-9]+" KEVLARFLOW_TORCH_VERSION "${KEVLARFLOW_TORCH_VERSION}")
list(LENGTH _torch_info _n)
set(KEVLARFLOW_TORCH_CUDA "")
if(_n GREATER 2)
  list(GET _torch_info 2 KEVLARFLOW_TORCH_CUDA)
endif()
list(APPEND CMAKE_PREFIX_PATH "${KEVLARFLOW_TORCH_CMAKE_PREFIX}")

# torch's headers need C++20 from 2.14 on (C++17 before): what includes them
# is built to the same standard. The torch-free kernels keep C++17.
if(KEVLARFLOW_TORCH_VERSION VERSION_GREATER_EQUAL 2.14)
  set(CMAKE_CXX_STANDARD 20)
endif()
