// The data ops of CommManager (send, recv, allreduce, broadcast) and the
// pending op an isend returns: argument checks, then the transport's op
// waited on with a deadline; a failed op breaks its group.
#include <functional>
#include <stdexcept>

#include "comm_manager.h"
#include "member_names.h"

namespace kevlarflow::comm {

// ---- ops ------------------------------------------------------------------

Millis CommManager::resolve(std::optional<Millis> deadline) const {
  Millis d = deadline.value_or(deadline_);
  if (d.count() <= 0) throw std::invalid_argument("the deadline must be positive");
  return d;
}

CommManager::Target CommManager::target(const std::string& group, const std::string& op,
                                        const at::Tensor& t, const std::string* peer,
                                        std::optional<int64_t> generation) {
  if (!t.defined()) throw std::invalid_argument(op + ": undefined tensor");
  if (t.layout() != at::kStrided) throw std::invalid_argument(op + ": only dense tensors are supported");
  if (!t.is_contiguous())
    throw std::invalid_argument(op + ": the tensor must be contiguous (call .contiguous() first)");
  std::lock_guard<std::mutex> lock(mu_);
  const Group& g = find(group);
  Target out{g.transport, g.generation, -1, "all of " + join(g.members)};
  if (generation && *generation != g.generation)
    throw CommFailure(ErrorKind::kAborted, group, g.generation, op,
                      peer ? quoted(*peer) : out.peer,
                      "an op of generation " + std::to_string(*generation) +
                          ", which was given up: the group is at generation " +
                          std::to_string(g.generation));
  if (peer) {
    out.peer_rank = index_of(g.members, *peer);
    out.peer = quoted(*peer);
    if (out.peer_rank < 0)
      throw std::invalid_argument(op + " on group '" + group + "': " + quoted(*peer) +
                                  " is not a member of generation " +
                                  std::to_string(g.generation) + " " + join(g.members));
    if (out.peer_rank == g.rank && op != "broadcast")
      throw std::invalid_argument(op + " on group '" + group + "': " + quoted(*peer) +
                                  " is this process itself");
  }
  if (!g.broken.empty() || !out.transport)
    throw CommFailure(ErrorKind::kAborted, group, g.generation, op, out.peer,
                      "the communicator is unusable: " + g.broken +
                          " (abort, shrink or rebuild it)");
  out.transport->check_tensor(t, op.c_str());
  return out;
}

// The backend gets its own handle on the tensor's storage: a gloo worker may
// release it after Python is gone (an op that outlives its caller, at exit),
// and releasing a Python-owned tensor would need the GIL.
static at::Tensor handle_of(const at::Tensor& t) {
  return t.detach();
}

void CommManager::fail_op(const std::string& group, const std::string& op, const Target& target,
                          const TransportError& e) {
  CommFailure failure(e.kind, group, target.generation, op, target.peer, e.what());
  mark_broken(group, target.generation, failure.what());
  throw failure;
}

void CommManager::run(const std::string& group, const std::string& op, const Target& target,
                      std::unique_ptr<Work> work, Millis deadline) {
  try {
    work->wait(deadline);
  } catch (const TransportError& e) {
    fail_op(group, op, target, e);
  }
}

std::unique_ptr<Work> CommManager::start(const std::string& group, const std::string& op,
                                         const Target& target,
                                         const std::function<std::unique_ptr<Work>()>& issue) {
  try {
    return issue();
  } catch (const TransportError& e) {
    fail_op(group, op, target, e);
  }
}

void CommManager::send(const std::string& group, const at::Tensor& t, const std::string& dst,
                       std::optional<Millis> deadline, std::optional<int64_t> generation) {
  Millis d = resolve(deadline);
  Target tg = target(group, "send", t, &dst, generation);
  run(group, "send", tg,
      start(group, "send", tg, [&] { return tg.transport->send(handle_of(t), tg.peer_rank, d); }), d);
}

std::shared_ptr<PendingOp> CommManager::isend(const std::string& group, const at::Tensor& t,
                                              const std::string& dst,
                                              std::optional<int64_t> generation) {
  Target tg = target(group, "isend", t, &dst, generation);
  auto w = start(group, "isend", tg,
                 [&] { return tg.transport->send(handle_of(t), tg.peer_rank, deadline_); });
  return std::make_shared<PendingOp>(weak_from_this(), group, tg.generation, "isend", tg.peer, t,
                                     std::move(w));
}

void CommManager::recv(const std::string& group, const at::Tensor& t, const std::string& src,
                       std::optional<Millis> deadline, std::optional<int64_t> generation) {
  Millis d = resolve(deadline);
  Target tg = target(group, "recv", t, &src, generation);
  run(group, "recv", tg,
      start(group, "recv", tg, [&] { return tg.transport->recv(handle_of(t), tg.peer_rank, d); }), d);
}

void CommManager::allreduce(const std::string& group, const at::Tensor& t,
                            std::optional<Millis> deadline) {
  Millis d = resolve(deadline);
  Target tg = target(group, "allreduce", t, nullptr);
  run(group, "allreduce", tg,
      start(group, "allreduce", tg, [&] { return tg.transport->allreduce_sum(handle_of(t), d); }), d);
}

void CommManager::broadcast(const std::string& group, const at::Tensor& t, const std::string& root,
                            std::optional<Millis> deadline) {
  Millis d = resolve(deadline);
  Target tg = target(group, "broadcast", t, &root);
  run(group, "broadcast", tg,
      start(group, "broadcast", tg,
            [&] { return tg.transport->broadcast(handle_of(t), tg.peer_rank, d); }),
      d);
}

// ---- PendingOp ------------------------------------------------------------

PendingOp::PendingOp(std::weak_ptr<CommManager> manager, std::string group, int64_t generation,
                     std::string op, std::string peer, at::Tensor tensor, std::unique_ptr<Work> work)
    : manager_(std::move(manager)),
      group_(std::move(group)),
      op_(std::move(op)),
      peer_(std::move(peer)),
      generation_(generation),
      tensor_(std::move(tensor)),
      work_(std::move(work)) {}

void PendingOp::wait(std::optional<Millis> deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return;
  auto manager = manager_.lock();
  Millis d = deadline.value_or(manager ? manager->default_deadline() : Millis(0));
  if (d.count() <= 0) throw std::invalid_argument("the deadline must be positive");
  try {
    work_->wait(d);
  } catch (const TransportError& e) {
    finished_ = true;
    CommFailure failure(e.kind, group_, generation_, op_, peer_, e.what());
    if (manager) manager->mark_broken(group_, generation_, failure.what());
    throw failure;
  }
  finished_ = true;
  tensor_ = at::Tensor();
}

}  // namespace kevlarflow::comm
