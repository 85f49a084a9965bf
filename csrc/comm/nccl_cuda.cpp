// CUDA side of the NCCL transport (built only with a CUDA torch).
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda_hooks.h"

namespace kevlarflow::comm {
namespace {

void set_device(int device) { c10::cuda::set_device(static_cast<c10::DeviceIndex>(device)); }

void* current_stream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

void* record_event(void* stream) {
  cudaEvent_t event = nullptr;
  if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) return nullptr;
  if (cudaEventRecord(event, static_cast<cudaStream_t>(stream)) != cudaSuccess) {
    cudaEventDestroy(event);
    return nullptr;
  }
  return event;
}

int query_event(void* event) {
  cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (e == cudaSuccess) return 1;
  if (e == cudaErrorNotReady) return 0;
  return -1;
}

void destroy_event(void* event) { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

const CudaHooks kHooks{set_device, current_stream, record_event, query_event, destroy_event};

}  // namespace

const CudaHooks* cuda_hooks() { return &kHooks; }

}  // namespace kevlarflow::comm
