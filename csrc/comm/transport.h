// One backend communicator (a gloo process group, an NCCL comm) behind the
// small interface the manager needs. A transport never outlives its
// generation: the manager retires it on abort, shrink or rebuild, and a new
// generation always gets a new transport.
#pragma once
#include <ATen/ATen.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace kevlarflow::comm {

using Millis = std::chrono::milliseconds;

// An issued operation. wait() returns when it completed, or throws
// TransportError: kTimeout once `timeout` has passed, kAborted if the
// transport was aborted meanwhile, kPeerFailure/kError for backend errors.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait(Millis timeout) = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* backend_name() const = 0;
  // Throws std::invalid_argument when this backend cannot take the tensor.
  virtual void check_tensor(const at::Tensor& t, const char* op) const = 0;
  // `timeout` bounds the backend's own waiting (its threads, its sockets), so
  // that they give up by the deadline too.
  virtual std::unique_ptr<Work> send(const at::Tensor& t, int dst, Millis timeout) = 0;
  virtual std::unique_ptr<Work> recv(const at::Tensor& t, int src, Millis timeout) = 0;
  virtual std::unique_ptr<Work> allreduce_sum(const at::Tensor& t, Millis timeout) = 0;
  virtual std::unique_ptr<Work> broadcast(const at::Tensor& t, int root, Millis timeout) = 0;
  // Ops issued and still waited on (for tests and diagnostics).
  virtual size_t inflight() const = 0;
  // The survivors' communicator without `excluded` (ranks), made from this
  // one by the backend itself; null where the backend cannot (then the
  // caller connects a new generation from scratch).
  virtual std::shared_ptr<Transport> shrink(const std::vector<int>& excluded, Millis timeout) {
    return nullptr;
  }
  // Wakes every waiter with kAborted and stops the backend where it can.
  // Never blocks; the transport is destroyed later, by the reaper.
  virtual void abort() = 0;
};

}  // namespace kevlarflow::comm
