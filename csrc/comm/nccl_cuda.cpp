// CUDA side of the NCCL transport (built only with a CUDA torch).
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda_hooks.h"

namespace kevlarflow::comm {
namespace {

int exchange_device(int device) {
  return c10::cuda::ExchangeDevice(static_cast<c10::DeviceIndex>(device));
}

// As torch's CUDAGuard restores: a thread that never used its (default)
// device gets it back without a primary context made on it, which would take
// memory on a GPU this process does not use.
void restore_device(int device) {
  (void)c10::cuda::MaybeSetDevice(static_cast<c10::DeviceIndex>(device));
}

void* current_stream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

void* record_event(void* stream) {
  cudaEvent_t event = nullptr;
  if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) return nullptr;
  if (cudaEventRecord(event, static_cast<cudaStream_t>(stream)) != cudaSuccess) {
    (void)cudaGetLastError();  // said by returning null; not left for the next launch check
    cudaEventDestroy(event);
    return nullptr;
  }
  return event;
}

int query_event(void* event) {
  cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (e == cudaSuccess) return 1;
  // "Not ready" is also left as the thread's last error: cleared, or the
  // next kernel launch on this thread (the forward pass) would report it.
  (void)cudaGetLastError();
  return e == cudaErrorNotReady ? 0 : -1;
}

void destroy_event(void* event) { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }

void* create_stream(int device) {
  int previous = exchange_device(device);
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) stream = nullptr;
  restore_device(previous);
  return stream;
}

void destroy_stream(void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  (void)cudaStreamSynchronize(s);  // errors ignored: this may run while the process exits
  (void)cudaStreamDestroy(s);
}

bool order_after(void* stream, void* earlier) {
  void* event = record_event(earlier);
  if (!event) return false;
  // Destroying an event another stream waits on is allowed: the wait keeps
  // the record it was queued behind.
  bool ok = cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event),
                                0) == cudaSuccess;
  destroy_event(event);
  return ok;
}

const CudaHooks kHooks{exchange_device, restore_device, current_stream, record_event,
                       query_event,     destroy_event,  create_stream,  destroy_stream,
                       order_after};

}  // namespace

const CudaHooks* cuda_hooks() { return &kHooks; }

}  // namespace kevlarflow::comm
