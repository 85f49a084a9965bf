// The registry of communicators of one process: group name -> generation,
// member list, own rank and transport, plus why the group is broken, if it
// is. Ops run here with a deadline; a failed op marks its group broken, and
// every later op on that group fails at once (kAborted) until the group is
// aborted, shrunk or rebuilt. Connecting a new generation is the caller's
// job (Python builds the gloo group); begin_generation() and install() bracket it.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "comm_error.h"
#include "transport.h"

namespace kevlarflow::comm {

class CommManager;

// An op issued without waiting (isend); wait() raises like the blocking op.
// Holds the tensor until it is done.
class PendingOp {
 public:
  PendingOp(std::weak_ptr<CommManager> manager, std::string group, int64_t generation,
            std::string op, std::string peer, at::Tensor tensor, std::unique_ptr<Work> work);
  void wait(std::optional<Millis> deadline);
  bool done() const { return finished_; }

 private:
  std::weak_ptr<CommManager> manager_;
  std::string group_, op_, peer_;
  int64_t generation_;
  at::Tensor tensor_;
  std::unique_ptr<Work> work_;
  bool finished_ = false;
  std::mutex mu_;
};

class CommManager : public std::enable_shared_from_this<CommManager> {
 public:
  CommManager(std::string me, Millis deadline);
  // A manager dropped without close() still never blocks: its transports go
  // to the reaper, not down with it.
  ~CommManager() { close(); }

  const std::string& me() const { return me_; }
  Millis default_deadline() const { return deadline_; }

  // Registers `group` at `generation` with `members`, with no transport yet
  // (ops fail as aborted until install()). Retires the group's current
  // transport. A generation at or below one this process already used for
  // the group is refused: its store keys may still be there.
  // Returns this process's rank in `members`.
  int begin_generation(const std::string& group, const std::vector<std::string>& members,
                       int64_t generation);
  // The new generation for shrink(excluded) / rebuild(): its members and number.
  std::pair<std::vector<std::string>, int64_t> shrink_plan(const std::string& group,
                                                           const std::vector<std::string>& excluded);
  int64_t rebuild_generation(const std::string& group);
  // shrink() done by the backend on the current communicator (NCCL's
  // ncclCommShrink), when the group is healthy and the backend can; returns
  // the new generation, or -1 when the caller must connect one instead.
  int64_t shrink_by_backend(const std::string& group, const std::vector<std::string>& excluded,
                            Millis timeout);
  // Attaches the connected transport of `generation`. If the group moved on
  // meanwhile (aborted, or another generation begun), the transport is
  // retired and kAborted raised.
  void install(const std::string& group, int64_t generation, std::shared_ptr<Transport> t);
  // Connecting failed: the group stays registered and broken.
  void fail(const std::string& group, int64_t generation, const std::string& why);

  void abort(const std::string& group);  // never blocks; unknown group is fine
  // abort(), only while `generation` is the group's current one: a caller
  // on another thread cannot hit a generation begun since it looked.
  void abort_generation(const std::string& group, int64_t generation);
  void close();                          // aborts every group; never blocks

  // Point-to-point ops. With `generation`, the op is for that generation
  // only: if the group is at another one (rebuilt meanwhile, on another
  // thread), it fails as aborted instead of reaching whoever is the peer
  // now, which would hand them data of another step.
  void send(const std::string& group, const at::Tensor& t, const std::string& dst,
            std::optional<Millis> deadline, std::optional<int64_t> generation = std::nullopt);
  std::shared_ptr<PendingOp> isend(const std::string& group, const at::Tensor& t,
                                   const std::string& dst,
                                   std::optional<int64_t> generation = std::nullopt);
  void recv(const std::string& group, const at::Tensor& t, const std::string& src,
            std::optional<Millis> deadline, std::optional<int64_t> generation = std::nullopt);
  void allreduce(const std::string& group, const at::Tensor& t, std::optional<Millis> deadline);
  void broadcast(const std::string& group, const at::Tensor& t, const std::string& root,
                 std::optional<Millis> deadline);

  bool has(const std::string& group) const;
  int64_t generation(const std::string& group) const;
  std::vector<std::string> members(const std::string& group) const;
  int rank(const std::string& group) const;
  // Empty while the group can run ops; otherwise why it cannot.
  std::string broken(const std::string& group) const;
  std::vector<std::string> groups() const;
  // Ops of the group's current transport still being waited on (0 without one).
  size_t inflight(const std::string& group) const;

  // A failed op of `generation` breaks the group, unless it moved on already.
  void mark_broken(const std::string& group, int64_t generation, const std::string& why);

 private:
  struct Group {
    int64_t generation = 0;
    std::vector<std::string> members;
    int rank = 0;
    std::shared_ptr<Transport> transport;
    std::string broken;
    bool connecting = false;  // between begin_generation() and install()/fail()
  };
  // What an op needs, copied out under the lock.
  struct Target {
    std::shared_ptr<Transport> transport;
    int64_t generation;
    int peer_rank;
    std::string peer;
  };

  const Group& find(const std::string& group) const;  // throws std::out_of_range
  Target target(const std::string& group, const std::string& op, const at::Tensor& t,
                const std::string* peer, std::optional<int64_t> generation = std::nullopt);
  Millis resolve(std::optional<Millis> deadline) const;
  // Issues an op on the transport; a transport that refuses it breaks the group.
  std::unique_ptr<Work> start(const std::string& group, const std::string& op,
                              const Target& target,
                              const std::function<std::unique_ptr<Work>()>& issue);
  void run(const std::string& group, const std::string& op, const Target& target,
           std::unique_ptr<Work> work, Millis deadline);
  [[noreturn]] void fail_op(const std::string& group, const std::string& op, const Target& target,
                            const TransportError& e);

  const std::string me_;
  const Millis deadline_;
  mutable std::mutex mu_;
  std::map<std::string, Group> groups_;
  // Highest generation ever begun per group, kept after abort.
  std::map<std::string, int64_t> last_generation_;
  bool closed_ = false;
};

}  // namespace kevlarflow::comm
