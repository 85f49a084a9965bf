#include "kv_replicator.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>

namespace kevlarflow::replication {

namespace {

constexpr int64_t kMaxStepsPerTransfer = 1 << 20;

// A transfer is a header [number of spans, number of steps], then (unless
// both are 0) each span's backup block, first row and end row, then the
// steps, then the packed rows. A header of zeros is a keepalive, so that an
// idle backup's receive deadline means a dead or hung source.
constexpr int64_t kHeaderBytes = 2 * sizeof(int64_t);
constexpr int64_t kSpanInts = 3;

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

KVReplicator::KVReplicator(std::unique_ptr<BlockPacker> packer, ChannelFactory channels,
                           int64_t max_transfer_bytes, Millis keepalive, Millis interval)
    : packer_(std::move(packer)), channels_(std::move(channels)),
      max_transfer_bytes_(max_transfer_bytes), keepalive_(keepalive), interval_(interval) {
  if (!packer_) throw std::invalid_argument("KVReplicator: no caches");
  if (!channels_) throw std::invalid_argument("KVReplicator: no communicator manager");
  if (keepalive_.count() <= 0) throw std::invalid_argument("KVReplicator: keepalive must be positive");
  if (interval_.count() < 0) throw std::invalid_argument("KVReplicator: interval must be >= 0");
  if (max_transfer_bytes < block_bytes())
    throw std::invalid_argument("KVReplicator: max_transfer_bytes " +
                                std::to_string(max_transfer_bytes) + " is below one block (" +
                                std::to_string(block_bytes()) + " bytes)");
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
                          int64_t step, const std::vector<int64_t>& begin,
                          const std::vector<int64_t>& end) {
  if (src.size() != dst.size())
    throw std::invalid_argument("KVReplicator.submit: src and dst differ in length");
  const bool whole = begin.empty() && end.empty();
  if (!whole && (begin.size() != src.size() || end.size() != src.size()))
    throw std::invalid_argument("KVReplicator.submit: begin and end must give one row range per "
                                "block, or be both empty (whole blocks)");
  const int64_t num_blocks = packer_->num_blocks(), rows = packer_->block_rows();
  for (size_t k = 0; k < src.size(); ++k) {
    if (src[k] < 0 || src[k] >= num_blocks || dst[k] < 0)
      throw std::invalid_argument("KVReplicator.submit: block ids must be in [0, " +
                                  std::to_string(num_blocks) + ") (source) and >= 0 (backup)");
    if (!whole && !(0 <= begin[k] && begin[k] < end[k] && end[k] <= rows))
      throw std::invalid_argument("KVReplicator.submit: rows [" + std::to_string(begin[k]) + ", " +
                                  std::to_string(end[k]) + ") are not a range within a block of " +
                                  std::to_string(rows));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!running_) return false;
  if (src.empty()) return true;
  // Before the entries are visible to the sending thread: a pack that takes
  // them also finds their fence.
  packer_->fence();
  uint64_t last = 0;
  for (size_t k = 0; k < src.size(); ++k) {
    const int64_t b = whole ? 0 : begin[k], e = whole ? rows : end[k];
    auto it = pending_.find(dst[k]);
    if (it != pending_.end()) {  // still waiting: it will be packed with this step's contents
      Entry& entry = it->second;
      entry.src = src[k];
      entry.begin = std::min(entry.begin, b);
      entry.end = std::max(entry.end, e);
      last = std::max(last, entry.order);
      ++stats_.blocks_coalesced;
      continue;
    }
    uint64_t order = next_order_++;
    pending_.emplace(dst[k], Entry{src[k], b, e, order});
    line_.emplace(order, dst[k]);
    last = std::max(last, order);
  }
  steps_.emplace_back(last, step);
  stats_.blocks_submitted += static_cast<int64_t>(src.size());
  stats_.pending_blocks = static_cast<int64_t>(pending_.size());
  wake_.notify_one();
  return true;
}

void KVReplicator::flush() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    flush_ = true;
  }
  wake_.notify_all();
}

void KVReplicator::loop(std::shared_ptr<LinkChannel> channel) {
  auto last_transfer = std::chrono::steady_clock::now() - interval_;
  try {
    while (true) {
      std::vector<BlockSpan> spans;  // at the source
      std::vector<int64_t> dst, steps;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait_for(lock, keepalive_, [&] { return !running_ || !line_.empty(); });
        if (!running_) return;
        if (!line_.empty()) {  // let the steps of one interval coalesce
          wake_.wait_until(lock, last_transfer + interval_, [&] { return !running_ || flush_; });
          if (!running_) return;
          flush_ = false;
          last_transfer = std::chrono::steady_clock::now();
        }
        int64_t bytes = 0;
        while (!line_.empty()) {
          auto first = line_.begin();
          auto entry = pending_.find(first->second);
          const Entry& e = entry->second;
          const int64_t span_bytes = (e.end - e.begin) * row_bytes();
          if (!spans.empty() && bytes + span_bytes > max_transfer_bytes_) break;
          bytes += span_bytes;
          spans.push_back(BlockSpan{e.src, e.begin, e.end});
          dst.push_back(first->second);
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
      send_transfer(*channel, spans, dst, steps);
    }
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.error = e.what();
    running_ = false;
    drop_pending();
  }
}

void KVReplicator::send_transfer(LinkChannel& channel, const std::vector<BlockSpan>& spans,
                                 const std::vector<int64_t>& dst,
                                 const std::vector<int64_t>& steps) {
  auto started = std::chrono::steady_clock::now();
  const int64_t n = static_cast<int64_t>(spans.size());
  const int64_t num_steps = static_cast<int64_t>(steps.size());
  const int64_t header[2] = {n, num_steps};
  channel.send(header, kHeaderBytes);
  if (n + num_steps == 0) return;
  std::vector<int64_t> meta(kSpanInts * n + num_steps);
  int64_t rows = 0;
  for (int64_t k = 0; k < n; ++k) {
    meta[kSpanInts * k] = dst[k];
    meta[kSpanInts * k + 1] = spans[k].begin;
    meta[kSpanInts * k + 2] = spans[k].end;
    rows += spans[k].rows();
  }
  std::copy(steps.begin(), steps.end(), meta.begin() + kSpanInts * n);
  channel.send(meta.data(), static_cast<int64_t>(meta.size() * sizeof(int64_t)));
  double pack_seconds = 0;
  if (n > 0) {
    const int64_t bytes = rows * row_bytes();
    void* staging = packer_->send_staging(bytes, staging_limit());
    auto pack_started = std::chrono::steady_clock::now();
    packer_->pack(spans.data(), n, staging);
    pack_seconds = seconds_since(pack_started);
    channel.send(staging, bytes);
  }
  const double took = seconds_since(started);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.transfers += 1;
  stats_.blocks_sent += n;
  stats_.bytes_sent += rows * row_bytes();
  stats_.pack_seconds += pack_seconds;
  stats_.send_seconds += took;
}

std::vector<int64_t> KVReplicator::receive(const std::string& group, const std::string& source,
                                           std::optional<Millis> deadline) {
  auto channel = channels_(group, source);
  int64_t header[2];
  channel->recv(header, kHeaderBytes, deadline);
  const int64_t n = header[0], num_steps = header[1];
  // A transfer's spans hold a row each at least, and at most max_transfer_bytes
  // (or one block) in all.
  const int64_t max_rows = staging_limit() / row_bytes();
  if (n < 0 || n > max_rows || num_steps < 0 || num_steps > kMaxStepsPerTransfer)
    throw std::invalid_argument("KVReplicator.receive: a transfer of " + std::to_string(n) +
                                " blocks and " + std::to_string(num_steps) +
                                " steps is out of bounds (the link is out of step)");
  if (n + num_steps == 0) return {};
  std::vector<int64_t> meta(kSpanInts * n + num_steps);
  channel->recv(meta.data(), static_cast<int64_t>(meta.size() * sizeof(int64_t)), deadline);
  int64_t rows = 0;
  double unpack_seconds = 0;
  if (n > 0) {
    const int64_t num_blocks = packer_->num_blocks(), block_rows = packer_->block_rows();
    std::vector<BlockSpan> spans(n);
    for (int64_t k = 0; k < n; ++k) {
      spans[k] = BlockSpan{meta[kSpanInts * k], meta[kSpanInts * k + 1], meta[kSpanInts * k + 2]};
      if (spans[k].block < 0 || spans[k].block >= num_blocks)
        throw std::invalid_argument("KVReplicator.receive: block id " +
                                    std::to_string(spans[k].block) + " is outside [0, " +
                                    std::to_string(num_blocks) + ")");
      if (!(0 <= spans[k].begin && spans[k].begin < spans[k].end && spans[k].end <= block_rows))
        throw std::invalid_argument("KVReplicator.receive: rows [" +
                                    std::to_string(spans[k].begin) + ", " +
                                    std::to_string(spans[k].end) + ") of block " +
                                    std::to_string(spans[k].block) +
                                    " are not a range within a block of " +
                                    std::to_string(block_rows));
      rows += spans[k].rows();
    }
    if (rows > max_rows)
      throw std::invalid_argument("KVReplicator.receive: a transfer of " + std::to_string(rows) +
                                  " rows is out of bounds (the link is out of step)");
    const int64_t bytes = rows * row_bytes();
    BlockPacker::ReceiveStaging staging(*packer_);
    void* data = staging.reserve(bytes, staging_limit());
    channel->recv(data, bytes, deadline);
    auto unpack_started = std::chrono::steady_clock::now();
    packer_->unpack(spans.data(), n, data);
    unpack_seconds = seconds_since(unpack_started);
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.unpack_seconds += unpack_seconds;
  stats_.blocks_received += n;
  stats_.bytes_received += rows * row_bytes();
  return std::vector<int64_t>(meta.begin() + kSpanInts * n, meta.end());
}

int64_t KVReplicator::staging_limit() const {
  // A transfer's rows: at most max_transfer_bytes, or one block.
  return std::max(max_transfer_bytes_, block_bytes()) / row_bytes() * row_bytes();
}

ReplicatorStats KVReplicator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace kevlarflow::replication
