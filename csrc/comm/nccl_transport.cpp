#include "nccl_transport.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "comm_error.h"
#include "cuda_hooks.h"
#include "nccl_lib.h"
#include "reaper.h"

namespace kevlarflow::comm {

#ifndef KEVLARFLOW_WITH_CUDA
const CudaHooks* cuda_hooks() { return nullptr; }
#endif

namespace {

using Clock = std::chrono::steady_clock;

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

nccl::DataType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return nccl::kFloat32;
    case at::kDouble: return nccl::kFloat64;
    case at::kHalf: return nccl::kFloat16;
    case at::kBFloat16: return nccl::kBfloat16;
    case at::kChar: return nccl::kInt8;
    case at::kByte: return nccl::kUint8;
    case at::kInt: return nccl::kInt32;
    case at::kLong: return nccl::kInt64;
    default:
      throw std::invalid_argument(std::string(op) + ": the NCCL backend does not take " +
                                  std::string(c10::toString(t.scalar_type())) + " tensors");
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
      hooks().set_device(device);
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
    hooks().set_device(device);
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
  NcclWork(std::shared_ptr<CommState> state, at::Tensor tensor, void* stream, bool enqueued)
      : state_(std::move(state)), tensor_(std::move(tensor)), stream_(stream) {
    if (enqueued) event_ = hooks().record_event(stream_);
  }

  ~NcclWork() override {
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

  void wait(Millis timeout) override {
    auto deadline = Clock::now() + timeout;
    nccl::Result failure = nccl::kSuccess;
    // The event must belong to the stream's device, whichever thread waits.
    hooks().set_device(state_->device);
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

 private:
  std::shared_ptr<CommState> state_;
  at::Tensor tensor_;
  void* stream_;
  void* event_ = nullptr;
  bool complete_ = false;
};

class NcclTransport final : public Transport {
 public:
  explicit NcclTransport(std::shared_ptr<CommState> state) : state_(std::move(state)) {}

  ~NcclTransport() override { state_->abort_now(); }

  const char* backend_name() const override { return "nccl"; }

  void check_tensor(const at::Tensor& t, const char* op) const override {
    if (!t.is_cuda())
      throw std::invalid_argument(std::string(op) + ": the NCCL backend takes CUDA tensors, got one on " +
                                  t.device().str());
    if (t.device().index() != state_->device)
      throw std::invalid_argument(std::string(op) + ": this NCCL communicator is on cuda:" +
                                  std::to_string(state_->device) + ", the tensor on " +
                                  t.device().str());
    dtype_of(t, op);
  }

  std::unique_ptr<Work> send(const at::Tensor& t, int dst, Millis) override {
    return issue(t, [&](void* s) {
      return state_->lib.Send(t.data_ptr(), t.numel(), dtype_of(t, "send"), dst, state_->comm, s);
    });
  }

  std::unique_ptr<Work> recv(const at::Tensor& t, int src, Millis) override {
    return issue(t, [&](void* s) {
      return state_->lib.Recv(t.data_ptr(), t.numel(), dtype_of(t, "recv"), src, state_->comm, s);
    });
  }

  std::unique_ptr<Work> allreduce_sum(const at::Tensor& t, Millis) override {
    return issue(t, [&](void* s) {
      return state_->lib.AllReduce(t.data_ptr(), t.data_ptr(), t.numel(), dtype_of(t, "allreduce"),
                                   nccl::kSum, state_->comm, s);
    });
  }

  std::unique_ptr<Work> broadcast(const at::Tensor& t, int root, Millis) override {
    return issue(t, [&](void* s) {
      return state_->lib.Broadcast(t.data_ptr(), t.data_ptr(), t.numel(),
                                   dtype_of(t, "broadcast"), root, state_->comm, s);
    });
  }

  size_t inflight() const override { return 0; }

  // Waiters see the flag at their next poll; ncclCommAbort runs when the
  // reaper destroys the state.
  void abort() override { state_->aborted = true; }

  std::shared_ptr<Transport> shrink(const std::vector<int>& excluded, Millis timeout) override;

 private:
  template <typename Call>
  std::unique_ptr<Work> issue(const at::Tensor& t, Call&& call) {
    if (state_->aborted) throw TransportError(ErrorKind::kAborted, "the communicator was aborted");
    hooks().set_device(state_->device);
    void* stream = state_->stream;
    if (!stream) throw TransportError(ErrorKind::kError, "no CUDA stream for the communicator");
    // The op starts after what the compute stream has queued so far: the
    // forward pass that produced a sent tensor, and the last users of the
    // memory the caching allocator handed a receive buffer from.
    if (!hooks().order_after(stream, hooks().current_stream(state_->device)))
      throw TransportError(ErrorKind::kError, "could not order the communicator's stream "
                                              "after the compute stream");
    nccl::Result r = call(stream);
    if (r != nccl::kSuccess && r != nccl::kInProgress)
      throw TransportError(kind_of(r), state_->lib.error(r, state_->comm));
    return std::make_unique<NcclWork>(state_, t, stream, r == nccl::kSuccess);
  }

  std::shared_ptr<CommState> state_;
};

// Polls a new communicator until it is ready; one that fails or misses the
// deadline is handed to the reaper (ncclCommAbort) before throwing.
std::shared_ptr<Transport> await_ready(const nccl::Lib& lib, nccl::Comm comm, int device,
                                       Millis timeout, const char* what) {
  auto state = std::make_shared<CommState>(lib, comm, device);
  nccl::Result result = nccl::kInProgress;
  bool done = poll_until(
      [&] {
        state->poll(&result);  // not shared yet: nothing can abort it meanwhile
        return result != nccl::kInProgress;
      },
      Clock::now() + timeout);
  if (done && result == nccl::kSuccess) return std::make_shared<NcclTransport>(std::move(state));
  std::string why = done ? lib.error(result, comm)
                         : std::string(what) + " did not complete within " +
                               std::to_string(timeout.count()) + " ms";
  ErrorKind kind = done ? kind_of(result) : ErrorKind::kTimeout;
  retire(std::make_shared<NcclTransport>(std::move(state)));
  throw TransportError(kind, why);
}

std::shared_ptr<Transport> NcclTransport::shrink(const std::vector<int>& excluded, Millis timeout) {
  const nccl::Lib& lib = state_->lib;
  // Excluding nobody is no shrink (NCCL rejects an empty list): connect anew.
  if (!lib.CommShrink || state_->aborted || excluded.empty()) return nullptr;
  hooks().set_device(state_->device);
  std::vector<int> ranks(excluded);
  nccl::Config config = nccl::nonblocking_config();
  nccl::Comm next = nullptr;
  nccl::Result r = lib.CommShrink(state_->comm, ranks.data(), static_cast<int>(ranks.size()), &next,
                                  &config, nccl::kShrinkAbort);
  if (r != nccl::kSuccess && r != nccl::kInProgress) {
    if (next) retire(std::make_shared<NcclTransport>(std::make_shared<CommState>(lib, next, state_->device)));
    throw TransportError(kind_of(r), lib.error(r, state_->comm));
  }
  return await_ready(lib, next, state_->device, timeout, "ncclCommShrink");
}

}  // namespace

std::string nccl_unique_id() {
  hooks();
  nccl::UniqueId id;
  nccl::Result r = nccl::lib().GetUniqueId(&id);
  if (r != nccl::kSuccess) throw std::runtime_error("ncclGetUniqueId: " + nccl::lib().error(r));
  return std::string(id.internal, sizeof(id.internal));
}

std::shared_ptr<Transport> make_nccl_transport(const std::string& unique_id, int rank, int size,
                                               int device, Millis timeout) {
  const CudaHooks& h = hooks();
  const nccl::Lib& lib = nccl::lib();
  nccl::UniqueId id;
  if (unique_id.size() != sizeof(id.internal))
    throw std::invalid_argument("an ncclUniqueId has 128 bytes, got " +
                                std::to_string(unique_id.size()));
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  h.set_device(device);
  nccl::Config config = nccl::nonblocking_config();
  nccl::Comm comm = nullptr;
  nccl::Result r = lib.CommInitRankConfig(&comm, size, id, rank, &config);
  if (r != nccl::kSuccess && r != nccl::kInProgress) {
    if (comm) retire(std::make_shared<NcclTransport>(std::make_shared<CommState>(lib, comm, device)));
    throw TransportError(kind_of(r), "ncclCommInitRankConfig: " + lib.error(r));
  }
  return await_ready(lib, comm, device, timeout, "ncclCommInitRankConfig");
}

std::string nccl_unavailable_reason() {
  try {
    hooks();
    nccl::lib();
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

std::string nccl_library_error() {
  try {
    nccl::lib();
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

int nccl_version() {
  try {
    return nccl::lib().version;
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace kevlarflow::comm
