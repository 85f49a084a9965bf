// The CUDA calls the NCCL transport needs, behind plain function pointers and
// void* streams/events, so that nccl_transport.cpp compiles without CUDA
// headers. nccl_cuda.cpp fills them in a CUDA build; otherwise cuda_hooks()
// is null and the NCCL backend says it was built without CUDA.
#pragma once

namespace kevlarflow::comm {

struct CudaHooks {
  int (*exchange_device)(int device);  // makes device current; returns the one it replaced
  void (*restore_device)(int device);  // gives a thread its device back, creating no CUDA
                                       // context on it if it has none
  void* (*current_stream)(int device);  // a cudaStream_t
  void* (*record_event)(void* stream);  // a new cudaEvent_t recorded on it
  int (*query_event)(void* event);      // 1 done, 0 not yet, -1 CUDA error
  void (*destroy_event)(void* event);
  void* (*create_stream)(int device);                // a new non-blocking cudaStream_t, or null
  void (*destroy_stream)(void* stream);              // once everything queued on it is done
  bool (*order_after)(void* stream, void* earlier);  // work queued on stream from now on
                                                     // starts after earlier's work so far
};

const CudaHooks* cuda_hooks();

}  // namespace kevlarflow::comm
