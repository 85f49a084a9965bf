// One NCCL communicator's state, shared by its transport and the ops it
// issued, and the wait for an op's end (nccl_transport.cpp makes and uses
// them). Internal to the NCCL backend.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm_error.h"
#include "cuda_hooks.h"
#include "nccl_lib.h"
#include "transport.h"

namespace kevlarflow::comm::nccl_backend {

using Clock = std::chrono::steady_clock;

// The CUDA calls; throws when kevlarflow was built without CUDA.
const CudaHooks& hooks();

// Makes a communicator's device current on this thread for the guard's
// scope and gives the thread its own device back after: a link is called from
// threads (the forward pass, the replicator's sender) whose current device
// belongs to their other GPU work.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : previous_(hooks().exchange_device(device)) {}
  ~DeviceGuard() { hooks().restore_device(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_;
};

// The error kind of an NCCL result.
ErrorKind kind_of(nccl::Result r);

// Polls `ready` until it returns true or `deadline` passes; sleeps between
// polls, from 20 us up to 1 ms, so a long wait costs no CPU.
template <typename Ready>
bool poll_until(Ready&& ready, Clock::time_point deadline) {
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    if (ready()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

// One NCCL communicator, shared by its transport and its works. The
// transport's destructor, which runs on the reaper thread, aborts it
// (ncclCommAbort also stops kernels stuck on a dead peer); a work that
// outlives the transport (an isend) then only sees it gone.
//
// Its ops run on a stream of its own, never on the compute stream, as in
// torch's ProcessGroupNCCL: a send waiting for its peer then holds back
// neither the next forward pass nor the replicator's write fence, and ops
// of two communicators (a borrowed worker's two pipelines) cannot wait for
// each other in one stream's order, which could deadlock two workers that
// post them in different orders.
struct CommState {
  CommState(const nccl::Lib& lib, nccl::Comm comm, int device)
      : lib(lib), comm(comm), device(device), stream(hooks().create_stream(device)) {}
  ~CommState() {
    abort_now();
    // Tensors kept for unfinished ops are freed (members, after this) only
    // once the aborted ops have left the stream.
    if (stream) {
      DeviceGuard guard(device);
      hooks().destroy_stream(stream);
    }
  }

  // The communicator's state, or false once it is aborted.
  bool poll(nccl::Result* state) {
    std::lock_guard<std::mutex> lock(mu);
    if (!comm) return false;
    *state = nccl::kSuccess;
    nccl::Result r = lib.CommGetAsyncError(comm, state);
    if (r != nccl::kSuccess) *state = r;
    return true;
  }

  std::string error(nccl::Result r) {
    std::lock_guard<std::mutex> lock(mu);
    return lib.error(r, comm);
  }

  void abort_now() {
    aborted = true;
    std::lock_guard<std::mutex> lock(mu);
    if (!comm) return;
    DeviceGuard guard(device);
    lib.CommAbort(comm);
    comm = nullptr;
  }

  // A tensor an unfinished op may still use: kept until the communicator is
  // gone and its stream drained.
  void keep_alive(const at::Tensor& t) {
    std::lock_guard<std::mutex> lock(keep_mu);
    keep.push_back(t);
  }

  const nccl::Lib& lib;
  std::mutex mu;     // guards comm against its abort
  nccl::Comm comm;   // null once aborted
  const int device;
  void* const stream;  // the communicator's ops; null if it could not be made
  std::atomic<bool> aborted{false};
  std::mutex keep_mu;
  std::vector<at::Tensor> keep;
};

class NcclWork final : public Work {
 public:
  // enqueued: the call returned ncclSuccess, so the op is on the stream and
  // its end can be marked now; otherwise wait() marks it once NCCL has
  // finished enqueueing. Marked later, the event would also cover ops issued
  // after this one on the communicator's stream.
  NcclWork(std::shared_ptr<CommState> state, at::Tensor tensor, void* stream, bool enqueued);
  ~NcclWork() override;
  void wait(Millis timeout) override;

 private:
  std::shared_ptr<CommState> state_;
  at::Tensor tensor_;
  void* stream_;
  void* event_ = nullptr;
  bool complete_ = false;
};

}  // namespace kevlarflow::comm::nccl_backend
