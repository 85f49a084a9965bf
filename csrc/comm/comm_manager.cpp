#include "comm_manager.h"

#include <algorithm>
#include <stdexcept>

#include "member_names.h"
#include "reaper.h"

namespace kevlarflow::comm {
namespace {

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

void CommManager::abort(const std::string& group) { abort_generation(group, -1); }

void CommManager::abort_generation(const std::string& group, int64_t generation) {
  std::shared_ptr<Transport> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = groups_.find(group);
    if (it == groups_.end()) return;
    if (generation >= 0 && it->second.generation != generation) return;
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

}  // namespace kevlarflow::comm
