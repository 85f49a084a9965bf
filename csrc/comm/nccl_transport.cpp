#include "nccl_transport.h"

#include <cstring>
#include <stdexcept>

#include "nccl_work.h"
#include "reaper.h"

namespace kevlarflow::comm {

namespace {

using nccl_backend::Clock;
using nccl_backend::CommState;
using nccl_backend::DeviceGuard;
using nccl_backend::hooks;
using nccl_backend::kind_of;
using nccl_backend::NcclWork;
using nccl_backend::poll_until;

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
    DeviceGuard guard(state_->device);
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
  DeviceGuard guard(state_->device);
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
  hooks();  // says so first when built without CUDA
  const nccl::Lib& lib = nccl::lib();
  nccl::UniqueId id;
  if (unique_id.size() != sizeof(id.internal))
    throw std::invalid_argument("an ncclUniqueId has 128 bytes, got " +
                                std::to_string(unique_id.size()));
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  DeviceGuard guard(device);
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
