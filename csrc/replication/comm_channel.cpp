#include "comm_channel.h"

#include <stdexcept>
#include <utility>

namespace kevlarflow::replication {
namespace {

class CommChannel final : public LinkChannel {
 public:
  CommChannel(std::shared_ptr<comm::CommManager> manager, std::string group, std::string peer)
      : manager_(std::move(manager)), group_(std::move(group)), peer_(std::move(peer)) {}

  void send(const void* data, int64_t bytes) override {
    // The op completes before send returns, so the buffer may be borrowed.
    manager_->send(group_, bytes_of(const_cast<void*>(data), bytes), peer_, std::nullopt);
  }

  void recv(void* data, int64_t bytes, std::optional<Millis> deadline) override {
    manager_->recv(group_, bytes_of(data, bytes), peer_, deadline);
  }

  void abort() override { manager_->abort(group_); }

 private:
  static at::Tensor bytes_of(void* data, int64_t bytes) {
    return at::from_blob(data, {bytes}, at::TensorOptions().dtype(at::kByte));
  }

  std::shared_ptr<comm::CommManager> manager_;
  std::string group_, peer_;
};

}  // namespace

ChannelFactory comm_channels(std::shared_ptr<comm::CommManager> manager) {
  if (!manager) throw std::invalid_argument("KVReplicator: no communicator manager");
  return [manager](const std::string& group, const std::string& peer) {
    return std::make_shared<CommChannel>(manager, group, peer);
  };
}

}  // namespace kevlarflow::replication
