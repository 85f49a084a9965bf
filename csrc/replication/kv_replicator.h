// Background replication of a worker's KV blocks to its backup.
//
// The forward pass only calls submit(): (source block, backup block) pairs,
// the rows of each block the step wrote, and the step. A dedicated thread
// packs pending blocks' rows into the packer's staging buffer (a
// BlockPacker) and sends them on the link's channel (a LinkChannel); the
// backup's receive() unpacks them into its replica blocks and returns the
// steps that are now durable there. Neither knows tensors: the bindings give
// it a CPU or a CUDA packer and channels over the communicator manager. The
// forward pass may return before its writes are done (CUDA): submit() fences
// them (BlockPacker::fence), and packing waits for the fence, not the caller.
//
// Bounded memory by construction: pending work is keyed by backup block, so
// a worker that falls behind coalesces (a block written by several steps is
// sent once, its rows the union of theirs, with its latest contents) and
// never holds more entries than the backup has blocks; one transfer holds at
// most max_transfer_bytes. Transfers start at most every `interval`, so that
// the blocks a decode step touches (the last one of each request) go once per
// interval, not once a step, and each time with only the rows written since.
//
// A step is acknowledged once every pair submitted up to it has been sent:
// entries keep their place in line when resubmitted, and a transfer takes the
// oldest entries first, so "nothing older than the step is pending" is exact.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "block_packer.h"
#include "link_channel.h"

namespace kevlarflow::replication {

struct ReplicatorStats {
  int64_t transfers = 0;         // sent, keepalives excluded
  int64_t blocks_sent = 0;       // spans: a block counts once per transfer it is in
  int64_t bytes_sent = 0;        // KV bytes (rows sent x row bytes)
  int64_t blocks_submitted = 0;
  int64_t blocks_coalesced = 0;  // submitted while the same block was still pending
  int64_t pending_blocks = 0;
  int64_t blocks_received = 0;
  int64_t bytes_received = 0;
  double pack_seconds = 0;       // gathering rows into staging, on the replication thread
                                 // (CUDA caches: waiting for the fenced writes included)
  double send_seconds = 0;       // packing and sending (wall time, waits included)
  double unpack_seconds = 0;     // scattering received rows, on the receiving thread
  std::string error;             // why the link stopped, if it did
};

class KVReplicator {
 public:
  // packer: this worker's caches; channels: the link to a peer.
  KVReplicator(std::unique_ptr<BlockPacker> packer, ChannelFactory channels,
               int64_t max_transfer_bytes, Millis keepalive, Millis interval = Millis(0));
  ~KVReplicator();

  // Start sending to `backup` on `group` (a link of two members). Refused
  // (std::logic_error) while a link is running: stop() it first.
  void start(const std::string& group, const std::string& backup);
  // Stops the link: aborts its group (a send blocked on a hung backup fails
  // at once), joins the thread, drops what is pending. Never blocks on a peer.
  void stop();
  // Queue rows [begin[k], end[k]) of src[k] -> backup block dst[k] (empty
  // begin and end: whole blocks); `step` is acknowledged by the backup once
  // they arrived. Returns false (and queues nothing) when no link is running.
  // CUDA caches: call it on the thread that queued the writes, with the
  // stream they were queued on current (or one ordered after it).
  bool submit(const std::vector<int64_t>& src, const std::vector<int64_t>& dst, int64_t step,
              const std::vector<int64_t>& begin = {}, const std::vector<int64_t>& end = {});
  // Send what is pending now, without waiting for the rest of the interval
  // (someone waits for it: an instance draining before it moves back).
  void flush();

  // One transfer from `source` on `group`, unpacked into this worker's
  // caches; returns the steps it completes (empty for a keepalive). Block ids
  // outside [0, num_blocks) are refused before anything is written.
  std::vector<int64_t> receive(const std::string& group, const std::string& source,
                               std::optional<Millis> deadline);

  ReplicatorStats stats() const;
  int64_t num_blocks() const { return packer_->num_blocks(); }
  int64_t block_bytes() const { return packer_->block_bytes(); }
  int64_t row_bytes() const { return packer_->row_bytes(); }

 private:
  struct Entry {
    int64_t src;
    int64_t begin, end;  // rows to send
    uint64_t order;      // place in line: kept when the block is submitted again
  };
  void loop(std::shared_ptr<LinkChannel> channel);
  void drop_pending();  // with mu_ held
  int64_t staging_limit() const;  // the most bytes of rows one transfer carries
  // spans: at the source; dst: the backup's block of each.
  void send_transfer(LinkChannel& channel, const std::vector<BlockSpan>& spans,
                     const std::vector<int64_t>& dst, const std::vector<int64_t>& steps);

  std::unique_ptr<BlockPacker> packer_;
  ChannelFactory channels_;
  int64_t max_transfer_bytes_;
  Millis keepalive_;
  Millis interval_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::map<int64_t, Entry> pending_;                 // backup block -> entry
  std::map<uint64_t, int64_t> line_;                 // order -> backup block
  std::deque<std::pair<uint64_t, int64_t>> steps_;   // (last order of the step, step)
  uint64_t next_order_ = 0;
  bool running_ = false;
  bool flush_ = false;  // the next transfer need not wait for the interval
  std::shared_ptr<LinkChannel> sending_;  // the running link's channel
  std::thread thread_;
  ReplicatorStats stats_;
};

}  // namespace kevlarflow::replication
