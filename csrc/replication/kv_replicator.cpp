#include "kv_replicator.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>

namespace kevlarflow::replication {

namespace {

constexpr int64_t kMaxStepsPerTransfer = 1 << 20;

// A transfer is a header [number of blocks, number of steps], then (unless
// both are 0) the backup's block ids and the steps, then the packed blocks.
// A header of zeros is a keepalive, so that an idle backup's receive
// deadline means a dead or hung source.
constexpr int64_t kHeaderBytes = 2 * sizeof(int64_t);

}  // namespace

KVReplicator::KVReplicator(std::unique_ptr<BlockPacker> packer, ChannelFactory channels,
                           int64_t max_transfer_bytes, Millis keepalive, Millis interval)
    : packer_(std::move(packer)), channels_(std::move(channels)), keepalive_(keepalive),
      interval_(interval) {
  if (!packer_) throw std::invalid_argument("KVReplicator: no caches");
  if (!channels_) throw std::invalid_argument("KVReplicator: no communicator manager");
  if (keepalive_.count() <= 0) throw std::invalid_argument("KVReplicator: keepalive must be positive");
  if (interval_.count() < 0) throw std::invalid_argument("KVReplicator: interval must be >= 0");
  if (max_transfer_bytes < block_bytes())
    throw std::invalid_argument("KVReplicator: max_transfer_bytes " +
                                std::to_string(max_transfer_bytes) + " is below one block (" +
                                std::to_string(block_bytes()) + " bytes)");
  max_blocks_per_transfer_ = max_transfer_bytes / block_bytes();
}

KVReplicator::~KVReplicator() { stop(); }

void KVReplicator::start(const std::string& group, const std::string& backup) {
  std::lock_guard<std::mutex> lock(mu_);
  if (running_) throw std::logic_error("KVReplicator: a link is running; stop() it first");
  if (thread_.joinable()) thread_.join();  // a link that stopped on an error (nothing pending)
  stats_.error.clear();
  running_ = true;
  sending_ = channels_(group, backup);
  thread_ = std::thread(&KVReplicator::loop, this, sending_);
}

void KVReplicator::stop() {
  std::shared_ptr<LinkChannel> channel;
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_ = false;
    channel = std::move(sending_);
  }
  if (channel) channel->abort();  // a send blocked on the backup fails now
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  drop_pending();
}

void KVReplicator::drop_pending() {
  pending_.clear();
  line_.clear();
  steps_.clear();
  stats_.pending_blocks = 0;
}

bool KVReplicator::submit(const std::vector<int64_t>& src, const std::vector<int64_t>& dst,
                          int64_t step) {
  if (src.size() != dst.size())
    throw std::invalid_argument("KVReplicator.submit: src and dst differ in length");
  const int64_t num_blocks = packer_->num_blocks();
  for (size_t k = 0; k < src.size(); ++k) {
    if (src[k] < 0 || src[k] >= num_blocks || dst[k] < 0)
      throw std::invalid_argument("KVReplicator.submit: block ids must be in [0, " +
                                  std::to_string(num_blocks) + ") (source) and >= 0 (backup)");
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!running_) return false;
  if (src.empty()) return true;
  uint64_t last = 0;
  for (size_t k = 0; k < src.size(); ++k) {
    auto it = pending_.find(dst[k]);
    if (it != pending_.end()) {  // still waiting: it will be packed with this step's contents
      it->second.src = src[k];
      last = std::max(last, it->second.order);
      ++stats_.blocks_coalesced;
      continue;
    }
    uint64_t order = next_order_++;
    pending_.emplace(dst[k], Entry{src[k], order});
    line_.emplace(order, dst[k]);
    last = std::max(last, order);
  }
  steps_.emplace_back(last, step);
  stats_.blocks_submitted += static_cast<int64_t>(src.size());
  stats_.pending_blocks = static_cast<int64_t>(pending_.size());
  wake_.notify_one();
  return true;
}

void KVReplicator::loop(std::shared_ptr<LinkChannel> channel) {
  auto last_transfer = std::chrono::steady_clock::now() - interval_;
  try {
    while (true) {
      std::vector<std::pair<int64_t, int64_t>> pairs;  // (src, dst)
      std::vector<int64_t> steps;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait_for(lock, keepalive_, [&] { return !running_ || !line_.empty(); });
        if (!running_) return;
        if (!line_.empty()) {  // let the steps of one interval coalesce
          wake_.wait_until(lock, last_transfer + interval_, [&] { return !running_; });
          if (!running_) return;
          last_transfer = std::chrono::steady_clock::now();
        }
        while (!line_.empty() && static_cast<int64_t>(pairs.size()) < max_blocks_per_transfer_) {
          auto first = line_.begin();
          auto entry = pending_.find(first->second);
          pairs.emplace_back(entry->second.src, first->second);
          pending_.erase(entry);
          line_.erase(first);
        }
        // Steps all of whose blocks are in this transfer or went before it.
        uint64_t oldest_left = line_.empty() ? std::numeric_limits<uint64_t>::max()
                                             : line_.begin()->first;
        while (!steps_.empty() && steps_.front().first < oldest_left) {
          steps.push_back(steps_.front().second);
          steps_.pop_front();
        }
        stats_.pending_blocks = static_cast<int64_t>(pending_.size());
      }
      send_transfer(*channel, pairs, steps);
    }
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.error = e.what();
    running_ = false;
    drop_pending();
  }
}

void KVReplicator::send_transfer(LinkChannel& channel,
                                 const std::vector<std::pair<int64_t, int64_t>>& pairs,
                                 const std::vector<int64_t>& steps) {
  auto started = std::chrono::steady_clock::now();
  const int64_t n = static_cast<int64_t>(pairs.size());
  const int64_t num_steps = static_cast<int64_t>(steps.size());
  const int64_t header[2] = {n, num_steps};
  channel.send(header, kHeaderBytes);
  if (n + num_steps == 0) return;
  std::vector<int64_t> meta(n + num_steps), src(n);
  for (int64_t k = 0; k < n; ++k) {
    src[k] = pairs[k].first;
    meta[k] = pairs[k].second;
  }
  std::copy(steps.begin(), steps.end(), meta.begin() + n);
  channel.send(meta.data(), static_cast<int64_t>(meta.size() * sizeof(int64_t)));
  if (n > 0) {
    std::vector<uint8_t> staging(static_cast<size_t>(n * block_bytes()));
    packer_->pack(src.data(), n, staging.data());
    channel.send(staging.data(), static_cast<int64_t>(staging.size()));
  }
  std::chrono::duration<double> took = std::chrono::steady_clock::now() - started;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.transfers += 1;
  stats_.blocks_sent += n;
  stats_.bytes_sent += n * block_bytes();
  stats_.send_seconds += took.count();
}

std::vector<int64_t> KVReplicator::receive(const std::string& group, const std::string& source,
                                           std::optional<Millis> deadline) {
  auto channel = channels_(group, source);
  int64_t header[2];
  channel->recv(header, kHeaderBytes, deadline);
  const int64_t n = header[0], num_steps = header[1];
  if (n < 0 || n > max_blocks_per_transfer_ || num_steps < 0 || num_steps > kMaxStepsPerTransfer)
    throw std::invalid_argument("KVReplicator.receive: a transfer of " + std::to_string(n) +
                                " blocks and " + std::to_string(num_steps) +
                                " steps is out of bounds (the link is out of step)");
  if (n + num_steps == 0) return {};
  std::vector<int64_t> meta(n + num_steps);
  channel->recv(meta.data(), static_cast<int64_t>(meta.size() * sizeof(int64_t)), deadline);
  if (n > 0) {
    const int64_t num_blocks = packer_->num_blocks();
    for (int64_t k = 0; k < n; ++k) {
      if (meta[k] < 0 || meta[k] >= num_blocks)
        throw std::invalid_argument("KVReplicator.receive: block id " + std::to_string(meta[k]) +
                                    " is outside [0, " + std::to_string(num_blocks) + ")");
    }
    std::vector<uint8_t> staging(static_cast<size_t>(n * block_bytes()));
    channel->recv(staging.data(), static_cast<int64_t>(staging.size()), deadline);
    packer_->unpack(meta.data(), n, staging.data());
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.blocks_received += n;
  return std::vector<int64_t>(meta.begin() + n, meta.end());
}

ReplicatorStats KVReplicator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace kevlarflow::replication
