// The transport of one replication link: ordered byte messages between its
// two members, each send or receive failing with an exception (never
// hanging past its deadline), and an abort that makes a blocked one fail at
// once. The replicator sees only this; comm_channel.h implements it over the
// communicator manager.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace kevlarflow::replication {

using Millis = std::chrono::milliseconds;

class LinkChannel {
 public:
  virtual ~LinkChannel() = default;
  virtual void send(const void* data, int64_t bytes) = 0;
  virtual void recv(void* data, int64_t bytes, std::optional<Millis> deadline) = 0;
  virtual void abort() = 0;
};

// The channel of link `group` to its other member `peer`.
using ChannelFactory =
    std::function<std::shared_ptr<LinkChannel>(const std::string& group, const std::string& peer)>;

}  // namespace kevlarflow::replication
