#include "comm_manager.h"

#include <algorithm>
#include <stdexcept>

#include "reaper.h"

namespace kevlarflow::comm {
namespace {

std::string quoted(const std::string& s) { return "'" + s + "'"; }

std::string join(const std::vector<std::string>& xs) {
  std::string out;
  for (const auto& x : xs) out += (out.empty() ? "" : ", ") + quoted(x);
  return "[" + out + "]";
}

int index_of(const std::vector<std::string>& members, const std::string& m) {
  auto it = std::find(members.begin(), members.end(), m);
  return it == members.end() ? -1 : static_cast<int>(it - members.begin());
}

void check_members(const std::vector<std::string>& members, const std::string& group) {
  if (members.empty()) throw std::invalid_argument("group '" + group + "': empty member list");
  std::set<std::string> seen;
  for (const auto& m : members) {
    if (m.empty()) throw std::invalid_argument("group '" + group + "': empty member id");
    if (!seen.insert(m).second)
      throw std::invalid_argument("group '" + group + "': member " + quoted(m) +
                                  " listed twice in " + join(members));
  }
}

}  // namespace

CommManager::CommManager(std::string me, Millis deadline) : me_(std::move(me)), deadline_(deadline) {
  if (me_.empty()) throw std::invalid_argument("CommManager: empty member id");
  if (deadline_.count() <= 0) throw std::invalid_argument("CommManager: the deadline must be positive");
}

// ---- group lifecycle ------------------------------------------------------

int CommManager::begin_generation(const std::string& group, const std::vector<std::string>& members,
                                  int64_t generation) {
  check_members(members, group);
  int rank = index_of(members, me_);
  if (rank < 0)
    throw std::invalid_argument("group '" + group + "': this process (" + quoted(me_) +
                                ") is not among the members " + join(members));
  if (generation < 0) throw std::invalid_argument("group '" + group + "': negative generation");
  std::shared_ptr<Transport> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_)
      throw CommFailure(ErrorKind::kAborted, group, generation, "build", "none",
                        "the communicator manager is closed");
    auto last = last_generation_.find(group);
    if (last != last_generation_.end() && generation <= last->second)
      throw std::invalid_argument("group '" + group + "': generation " + std::to_string(generation) +
                                  " is not newer than generation " + std::to_string(last->second) +
                                  " already used here; each generation is built once");
    last_generation_[group] = generation;
    Group& g = groups_[group];
    old = std::move(g.transport);
    g = Group{generation, members, rank, nullptr,
              "generation " + std::to_string(generation) + " is not connected yet", true};
  }
  if (old) {
    old->abort();
    retire(std::move(old));
  }
  return rank;
}

std::pair<std::vector<std::string>, int64_t> CommManager::shrink_plan(
    const std::string& group, const std::vector<std::string>& excluded) {
  std::lock_guard<std::mutex> lock(mu_);
  const Group& g = find(group);
  std::set<std::string> out(excluded.begin(), excluded.end());
  for (const auto& x : out) {
    if (x == me_)
      throw std::invalid_argument("shrink of group '" + group + "': this process (" + quoted(me_) +
                                  ") cannot exclude itself");
    if (index_of(g.members, x) < 0)
      throw std::invalid_argument("shrink of group '" + group + "': " + quoted(x) +
                                  " is not a member of generation " + std::to_string(g.generation) +
                                  " " + join(g.members));
  }
  std::vector<std::string> survivors;
  for (const auto& m : g.members)
    if (!out.count(m)) survivors.push_back(m);
  return {survivors, last_generation_.at(group) + 1};
}

int64_t CommManager::rebuild_generation(const std::string& group) {
  std::lock_guard<std::mutex> lock(mu_);
  auto last = last_generation_.find(group);
  return last == last_generation_.end() ? 0 : last->second + 1;
}

int64_t CommManager::shrink_by_backend(const std::string& group,
                                       const std::vector<std::string>& excluded, Millis timeout) {
  auto [survivors, generation] = shrink_plan(group, excluded);
  std::shared_ptr<Transport> old;
  std::vector<int> ranks;
  int64_t old_generation;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const Group& g = find(group);
    if (!g.broken.empty() || !g.transport) return -1;
    old = g.transport;
    old_generation = g.generation;
    for (const auto& x : std::set<std::string>(excluded.begin(), excluded.end()))
      ranks.push_back(index_of(g.members, x));
    std::sort(ranks.begin(), ranks.end());  // the same list on every survivor
  }
  std::shared_ptr<Transport> next;
  try {
    next = old->shrink(ranks, timeout);
  } catch (const TransportError& e) {
    CommFailure failure(e.kind, group, generation, "shrink", "all of " + join(survivors), e.what());
    mark_broken(group, old_generation, failure.what());
    throw failure;
  }
  if (!next) return -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = groups_.find(group);
    if (!closed_ && it != groups_.end() && it->second.transport == old &&
        last_generation_[group] == old_generation) {
      last_generation_[group] = generation;
      it->second = Group{generation, survivors, index_of(survivors, me_), next, "", false};
      next = nullptr;
    }
  }
  if (next) {  // aborted meanwhile
    next->abort();
    retire(std::move(next));
    throw CommFailure(ErrorKind::kAborted, group, generation, "shrink", "none",
                      "the group was aborted or moved to another generation while shrinking");
  }
  old->abort();
  retire(std::move(old));
  return generation;
}

void CommManager::install(const std::string& group, int64_t generation,
                          std::shared_ptr<Transport> t) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = groups_.find(group);
    if (!closed_ && it != groups_.end() && it->second.generation == generation &&
        it->second.connecting) {
      it->second.transport = std::move(t);
      it->second.broken.clear();
      it->second.connecting = false;
      return;
    }
  }
  t->abort();
  retire(std::move(t));
  throw CommFailure(ErrorKind::kAborted, group, generation, "build", "none",
                    "the group was aborted or moved to another generation while connecting");
}

void CommManager::fail(const std::string& group, int64_t generation, const std::string& why) {
  mark_broken(group, generation, "building generation " + std::to_string(generation) +
                                     " failed: " + why);
}

void CommManager::abort(const std::string& group) {
  std::shared_ptr<Transport> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = groups_.find(group);
    if (it == groups_.end()) return;
    old = std::move(it->second.transport);
    if (old || it->second.connecting) it->second.broken = "aborted";
    it->second.connecting = false;
  }
  if (old) {
    old->abort();
    retire(std::move(old));
  }
}

void CommManager::close() {
  std::vector<std::shared_ptr<Transport>> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    for (auto& [name, g] : groups_) {
      if (g.transport) old.push_back(std::move(g.transport));
      g.broken = "the communicator manager is closed";
      g.connecting = false;
    }
  }
  for (auto& t : old) {
    t->abort();
    retire(std::move(t));
  }
}

void CommManager::mark_broken(const std::string& group, int64_t generation, const std::string& why) {
  std::shared_ptr<Transport> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = groups_.find(group);
    if (it == groups_.end() || it->second.generation != generation) return;
    // The first reason stays: later failures are its consequences.
    if (it->second.transport || it->second.connecting) it->second.broken = why;
    it->second.connecting = false;
    old = std::move(it->second.transport);
  }
  if (old) {
    old->abort();
    retire(std::move(old));
  }
}

// ---- queries --------------------------------------------------------------

const CommManager::Group& CommManager::find(const std::string& group) const {
  auto it = groups_.find(group);
  if (it == groups_.end())
    throw std::invalid_argument("unknown communicator group '" + group + "' (build it first)");
  return it->second;
}

bool CommManager::has(const std::string& group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return groups_.count(group) > 0;
}

int64_t CommManager::generation(const std::string& group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return find(group).generation;
}

std::vector<std::string> CommManager::members(const std::string& group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return find(group).members;
}

int CommManager::rank(const std::string& group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return find(group).rank;
}

std::string CommManager::broken(const std::string& group) const {
  std::lock_guard<std::mutex> lock(mu_);
  return find(group).broken;
}

std::vector<std::string> CommManager::groups() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& kv : groups_) out.push_back(kv.first);
  return out;
}

size_t CommManager::inflight(const std::string& group) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Group& g = find(group);
  return g.transport ? g.transport->inflight() : 0;
}

// ---- ops ------------------------------------------------------------------

Millis CommManager::resolve(std::optional<Millis> deadline) const {
  Millis d = deadline.value_or(deadline_);
  if (d.count() <= 0) throw std::invalid_argument("the deadline must be positive");
  return d;
}

CommManager::Target CommManager::target(const std::string& group, const std::string& op,
                                        const at::Tensor& t, const std::string* peer) {
  if (!t.defined()) throw std::invalid_argument(op + ": undefined tensor");
  if (t.layout() != at::kStrided) throw std::invalid_argument(op + ": only dense tensors are supported");
  if (!t.is_contiguous())
    throw std::invalid_argument(op + ": the tensor must be contiguous (call .contiguous() first)");
  std::lock_guard<std::mutex> lock(mu_);
  const Group& g = find(group);
  Target out{g.transport, g.generation, -1, "all of " + join(g.members)};
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
                       std::optional<Millis> deadline) {
  Millis d = resolve(deadline);
  Target tg = target(group, "send", t, &dst);
  run(group, "send", tg,
      start(group, "send", tg, [&] { return tg.transport->send(handle_of(t), tg.peer_rank, d); }), d);
}

std::shared_ptr<PendingOp> CommManager::isend(const std::string& group, const at::Tensor& t,
                                              const std::string& dst) {
  Target tg = target(group, "isend", t, &dst);
  auto w = start(group, "isend", tg,
                 [&] { return tg.transport->send(handle_of(t), tg.peer_rank, deadline_); });
  return std::make_shared<PendingOp>(weak_from_this(), group, tg.generation, "isend", tg.peer, t,
                                     std::move(w));
}

void CommManager::recv(const std::string& group, const at::Tensor& t, const std::string& src,
                       std::optional<Millis> deadline) {
  Millis d = resolve(deadline);
  Target tg = target(group, "recv", t, &src);
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
