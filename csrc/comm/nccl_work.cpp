#include "nccl_work.h"

#include <stdexcept>

namespace kevlarflow::comm {

#ifndef KEVLARFLOW_WITH_CUDA
const CudaHooks* cuda_hooks() { return nullptr; }
#endif

namespace nccl_backend {

const CudaHooks& hooks() {
  const CudaHooks* h = cuda_hooks();
  if (!h)
    throw std::runtime_error("the NCCL backend is unavailable: kevlarflow was built without CUDA "
                             "(it is built against a CPU torch)");
  return *h;
}

ErrorKind kind_of(nccl::Result r) {
  // A remote error or a system (socket) error is what a dead peer looks like.
  return (r == nccl::kRemoteError || r == nccl::kSystemError) ? ErrorKind::kPeerFailure
                                                              : ErrorKind::kError;
}

NcclWork::NcclWork(std::shared_ptr<CommState> state, at::Tensor tensor, void* stream,
                   bool enqueued)
    : state_(std::move(state)), tensor_(std::move(tensor)), stream_(stream) {
  if (enqueued) event_ = hooks().record_event(stream_);
}

NcclWork::~NcclWork() {
  // Not seen to end (dropped unwaited, failed, timed out): the op may still
  // read or write the tensor on the communicator's stream until the abort.
  if (!complete_) {
    try {
      state_->keep_alive(tensor_);
    } catch (...) {  // out of memory in a destructor: leak the tensor instead
      new at::Tensor(tensor_);
    }
  }
  if (event_) hooks().destroy_event(event_);
}

void NcclWork::wait(Millis timeout) {
  auto deadline = Clock::now() + timeout;
  nccl::Result failure = nccl::kSuccess;
  // The event must belong to the stream's device, whichever thread waits.
  DeviceGuard guard(state_->device);
  // First the enqueue itself (a non-blocking call may still be in
  // progress), then the kernel, through an event recorded behind it.
  bool done = poll_until(
      [&] {
        nccl::Result r;
        if (state_->aborted || !state_->poll(&r)) return true;
        if (r == nccl::kInProgress) return false;
        failure = r;
        if (r != nccl::kSuccess) return true;
        if (!event_) event_ = hooks().record_event(stream_);
        int q = event_ ? hooks().query_event(event_) : -1;
        if (q < 0) failure = nccl::kUnhandledCudaError;
        return q != 0;
      },
      deadline);
  if (state_->aborted)
    throw TransportError(ErrorKind::kAborted, "the communicator was aborted");
  if (!done)
    throw TransportError(ErrorKind::kTimeout,
                         "no completion within " + std::to_string(timeout.count()) + " ms");
  if (failure != nccl::kSuccess)
    throw TransportError(kind_of(failure), state_->error(failure));
  // The host saw the op end: work the caller queues on its compute stream
  // from now on reads a received tensor whole.
  complete_ = true;
}

}  // namespace nccl_backend
}  // namespace kevlarflow::comm
