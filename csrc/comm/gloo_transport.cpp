#include "gloo_transport.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "comm_error.h"

namespace kevlarflow::comm {
namespace {

// What a waiter and an abort share about one in-flight op.
struct Inflight {
  c10::intrusive_ptr<c10d::Work> work;
  bool point_to_point;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool aborted = false;
};

class GlooWork final : public Work {
 public:
  explicit GlooWork(std::shared_ptr<Inflight> op) : op_(std::move(op)) {}

  void wait(Millis timeout) override {
    if (op_->point_to_point) return wait_point_to_point(timeout);
    std::unique_lock<std::mutex> lock(op_->mu);
    op_->cv.wait_for(lock, timeout, [&] { return op_->done || op_->aborted; });
    if (op_->aborted) throw TransportError(ErrorKind::kAborted, "the communicator was aborted");
    if (!op_->done)
      throw TransportError(ErrorKind::kTimeout,
                           "no completion within " + std::to_string(timeout.count()) + " ms");
    lock.unlock();
    auto future = op_->work->getFuture();
    if (future->hasError()) {
      std::string text = future->tryRetrieveErrorMessage();
      throw TransportError(classify_backend_error(text), text);
    }
  }

 private:
  // Gloo's send/recv work waits on its own buffer, which abort() can wake.
  void wait_point_to_point(Millis timeout) {
    bool completed = false;
    try {
      completed = op_->work->wait(timeout);
    } catch (const std::exception& e) {
      throw TransportError(classify_backend_error(e.what()), e.what());
    }
    if (!completed) throw TransportError(ErrorKind::kAborted, "the communicator was aborted");
  }

  std::shared_ptr<Inflight> op_;
};

class GlooTransport final : public Transport {
 public:
  explicit GlooTransport(c10::intrusive_ptr<c10d::Backend> backend)
      : backend_(std::move(backend)) {}

  const char* backend_name() const override { return "gloo"; }

  void check_tensor(const at::Tensor& t, const char* op) const override {
    if (!t.device().is_cpu())
      throw std::invalid_argument(std::string(op) + ": the gloo backend takes CPU tensors, got one on " +
                                  t.device().str());
    switch (t.scalar_type()) {
      case at::kFloat: case at::kDouble: case at::kHalf: case at::kBFloat16:
      case at::kChar: case at::kByte: case at::kInt: case at::kLong:
        return;
      default:
        throw std::invalid_argument(std::string(op) + ": the gloo backend does not take " +
                                    std::string(c10::toString(t.scalar_type())) + " tensors");
    }
  }

  // The dtype is the tag: a send can only match a recv of the same dtype, so
  // bytes are never reinterpreted as another type.
  std::unique_ptr<Work> send(const at::Tensor& t, int dst, Millis) override {
    std::vector<at::Tensor> ts{t};
    return track(
        [&] { return backend_->send(ts, dst, tag_of(t)); }, true);
  }

  std::unique_ptr<Work> recv(const at::Tensor& t, int src, Millis) override {
    std::vector<at::Tensor> ts{t};
    return track([&] { return backend_->recv(ts, src, tag_of(t)); }, true);
  }

  std::unique_ptr<Work> allreduce_sum(const at::Tensor& t, Millis timeout) override {
    std::vector<at::Tensor> ts{t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    return track([&] { bound(timeout); return backend_->allreduce(ts, opts); }, false);
  }

  std::unique_ptr<Work> broadcast(const at::Tensor& t, int root, Millis timeout) override {
    std::vector<at::Tensor> ts{t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    return track([&] { bound(timeout); return backend_->broadcast(ts, opts); }, false);
  }

  size_t inflight() const override {
    std::lock_guard<std::mutex> lock(mu_);
    size_t n = 0;
    for (const auto& w : inflight_) n += !w.expired();
    return n;
  }

  void abort() override {
    std::vector<std::shared_ptr<Inflight>> live;
    {
      std::lock_guard<std::mutex> lock(mu_);
      aborted_ = true;
      for (auto& w : inflight_)
        if (auto op = w.lock()) live.push_back(std::move(op));
      inflight_.clear();
    }
    for (auto& op : live) cancel(*op);
  }

 private:
  static int tag_of(const at::Tensor& t) { return static_cast<int>(t.scalar_type()); }

  // Gloo's worker threads stop waiting on a peer after this (called with issue_mu_ held).
  void bound(Millis timeout) {
    if (timeout != timeout_) {
      backend_->setTimeout(timeout);
      timeout_ = timeout;
    }
  }

  // Issuing is not done under mu_: torch's flight recorder may take the GIL
  // inside the backend call, and a Python thread holding the GIL may be
  // waiting for mu_ (inflight(), abort()). issue_mu_ only orders issuing
  // threads, which never hold the GIL.
  template <typename Issue>
  std::unique_ptr<Work> track(Issue&& issue, bool point_to_point) {
    auto op = std::make_shared<Inflight>();
    op->point_to_point = point_to_point;
    {
      std::lock_guard<std::mutex> issuing(issue_mu_);
      if (is_aborted()) throw TransportError(ErrorKind::kAborted, "the communicator was aborted");
      try {
        op->work = issue();
      } catch (const std::exception& e) {
        throw TransportError(classify_backend_error(e.what()), e.what());
      }
    }
    bool aborted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      aborted = aborted_;
      if (!aborted) {
        // Drop entries of finished ops so the list stays short.
        inflight_.erase(std::remove_if(inflight_.begin(), inflight_.end(),
                                       [](const std::weak_ptr<Inflight>& w) { return w.expired(); }),
                        inflight_.end());
        inflight_.push_back(op);
      }
    }
    if (aborted) {  // abort() ran while this op was being issued
      cancel(*op);
      throw TransportError(ErrorKind::kAborted, "the communicator was aborted");
    }
    if (!point_to_point) {
      std::weak_ptr<Inflight> weak = op;
      op->work->getFuture()->addCallback([weak](c10::ivalue::Future&) {
        if (auto o = weak.lock()) {
          {
            std::lock_guard<std::mutex> lock(o->mu);
            o->done = true;
          }
          o->cv.notify_all();
        }
      });
    }
    return std::make_unique<GlooWork>(std::move(op));
  }

  bool is_aborted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return aborted_;
  }

  // Wakes the op's waiter; a gloo send/recv can also be stopped. Gloo has no
  // way to cancel a collective: its worker gives up at the gloo timeout.
  static void cancel(Inflight& op) {
    {
      std::lock_guard<std::mutex> lock(op.mu);
      op.aborted = true;
    }
    op.cv.notify_all();
    if (op.point_to_point) {
      try {
        op.work->abort();
      } catch (const std::exception&) {
      }
    }
  }

  c10::intrusive_ptr<c10d::Backend> backend_;
  std::mutex issue_mu_;
  mutable std::mutex mu_;  // never held across a backend call
  bool aborted_ = false;
  Millis timeout_{-1};
  std::vector<std::weak_ptr<Inflight>> inflight_;
};

}  // namespace

std::shared_ptr<Transport> make_gloo_transport(c10::intrusive_ptr<c10d::Backend> backend) {
  if (!backend) throw std::invalid_argument("gloo transport: no process group given");
  return std::make_shared<GlooTransport>(std::move(backend));
}

}  // namespace kevlarflow::comm
