#include "kv_replicator.h"

#include <chrono>
#include <limits>
#include <stdexcept>

#include "cache_ops.h"

namespace kevlarflow::replication {

namespace {

constexpr int64_t kMaxStepsPerTransfer = 1 << 20;

// The transfer header: blocks and steps that follow ([n dst ids, steps], then
// n packed blocks). A header of zeros is a keepalive, so that an idle
// backup's receive deadline means a dead or hung source.
at::Tensor header(int64_t num_blocks, int64_t num_steps) {
  auto t = at::empty({2}, at::kLong);
  t[0] = num_blocks;
  t[1] = num_steps;
  return t;
}

}  // namespace

KVReplicator::KVReplicator(std::shared_ptr<comm::CommManager> comm, std::vector<at::Tensor> caches,
                           int64_t max_transfer_bytes, comm::Millis keepalive,
                           comm::Millis interval)
    : comm_(std::move(comm)), caches_(std::move(caches)), keepalive_(keepalive),
      interval_(interval) {
  if (!comm_) throw std::invalid_argument("KVReplicator: no communicator manager");
  if (caches_.empty()) throw std::invalid_argument("KVReplicator: no caches");
  if (keepalive_.count() <= 0) throw std::invalid_argument("KVReplicator: keepalive must be positive");
  if (interval_.count() < 0) throw std::invalid_argument("KVReplicator: interval must be >= 0");
  const at::Tensor& first = caches_.front();
  for (const at::Tensor& c : caches_) {
    if (!c.defined() || c.device().type() != at::kCPU || !c.is_contiguous() || c.dim() < 1)
      throw std::invalid_argument("KVReplicator: caches must be contiguous CPU tensors");
    if (c.sizes() != first.sizes() || c.scalar_type() != first.scalar_type())
      throw std::invalid_argument("KVReplicator: every cache must have the shape and dtype of the first");
    ptrs_.push_back(c.data_ptr());
  }
  num_blocks_ = first.size(0);
  if (num_blocks_ < 1) throw std::invalid_argument("KVReplicator: caches hold no block");
  block_bytes_ = first.numel() / num_blocks_ * static_cast<int64_t>(first.element_size());
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
  group_ = group;
  thread_ = std::thread(&KVReplicator::loop, this, group, backup);
}

void KVReplicator::stop() {
  std::string group;
  bool was_running;
  {
    std::lock_guard<std::mutex> lock(mu_);
    was_running = running_;
    running_ = false;
    group = group_;
  }
  if (was_running) comm_->abort(group);  // a send blocked on the backup fails now
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
  for (size_t k = 0; k < src.size(); ++k) {
    if (src[k] < 0 || src[k] >= num_blocks_ || dst[k] < 0)
      throw std::invalid_argument("KVReplicator.submit: block ids must be in [0, " +
                                  std::to_string(num_blocks_) + ") (source) and >= 0 (backup)");
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

void KVReplicator::loop(std::string group, std::string backup) {
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
      send_transfer(group, backup, pairs, steps);
    }
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.error = e.what();
    running_ = false;
    drop_pending();
  }
}

void KVReplicator::send_transfer(const std::string& group, const std::string& backup,
                                 const std::vector<std::pair<int64_t, int64_t>>& pairs,
                                 const std::vector<int64_t>& steps) {
  auto started = std::chrono::steady_clock::now();
  const int64_t n = static_cast<int64_t>(pairs.size());
  const int64_t num_steps = static_cast<int64_t>(steps.size());
  comm_->send(group, header(n, num_steps), backup, std::nullopt);
  if (n + num_steps == 0) return;
  auto meta = at::empty({n + num_steps}, at::kLong);
  auto src = at::empty({n}, at::kLong);
  int64_t* m = meta.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {
    src.data_ptr<int64_t>()[k] = pairs[k].first;
    m[k] = pairs[k].second;
  }
  for (int64_t k = 0; k < num_steps; ++k) m[n + k] = steps[k];
  comm_->send(group, meta, backup, std::nullopt);
  if (n > 0) {
    auto staging = at::empty({n * block_bytes()}, at::kByte);
    BlockCaches caches{ptrs_.data(), static_cast<int64_t>(ptrs_.size()), block_bytes_};
    // Serial: this thread must not compete with the forward pass for cores.
    pack_blocks_cpu(caches, src.data_ptr<int64_t>(), n, staging.data_ptr(), serial_for);
    comm_->send(group, staging, backup, std::nullopt);
  }
  std::chrono::duration<double> took = std::chrono::steady_clock::now() - started;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.transfers += 1;
  stats_.blocks_sent += n;
  stats_.bytes_sent += n * block_bytes();
  stats_.send_seconds += took.count();
}

std::vector<int64_t> KVReplicator::receive(const std::string& group, const std::string& source,
                                           std::optional<comm::Millis> deadline) {
  auto head = at::empty({2}, at::kLong);
  comm_->recv(group, head, source, deadline);
  const int64_t n = head[0].item<int64_t>(), num_steps = head[1].item<int64_t>();
  if (n < 0 || n > max_blocks_per_transfer_ || num_steps < 0 || num_steps > kMaxStepsPerTransfer)
    throw std::invalid_argument("KVReplicator.receive: a transfer of " + std::to_string(n) +
                                " blocks and " + std::to_string(num_steps) +
                                " steps is out of bounds (the link is out of step)");
  if (n + num_steps == 0) return {};
  auto meta = at::empty({n + num_steps}, at::kLong);
  comm_->recv(group, meta, source, deadline);
  const int64_t* m = meta.data_ptr<int64_t>();
  if (n > 0) {
    for (int64_t k = 0; k < n; ++k) {
      if (m[k] < 0 || m[k] >= num_blocks_)
        throw std::invalid_argument("KVReplicator.receive: block id " + std::to_string(m[k]) +
                                    " is outside [0, " + std::to_string(num_blocks_) + ")");
    }
    auto staging = at::empty({n * block_bytes()}, at::kByte);
    comm_->recv(group, staging, source, deadline);
    BlockCaches caches{ptrs_.data(), static_cast<int64_t>(ptrs_.size()), block_bytes_};
    unpack_blocks_cpu(caches, m, n, staging.data_ptr(), serial_for);
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.blocks_received += n;
  return std::vector<int64_t>(m + n, m + n + num_steps);
}

ReplicatorStats KVReplicator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace kevlarflow::replication
