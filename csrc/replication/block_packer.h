// Moving KV between a worker's caches and a contiguous staging buffer: the
// unit one replication transfer carries. A transfer carries spans, runs of
// token rows of one block: a decode step adds one row to a block already
// sent, and only the new rows need to travel. The staging layout is
// span-major over every cache ([n, num_caches, rows of the span, row
// bytes]). The CPU packer is in cpu_packer.cpp; the CUDA packer
// (cuda_packer.cpp, packing on streams of its own into pinned host memory)
// implements the same interface.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace kevlarflow::replication {

// Rows [begin, end) of block `block` (0 <= begin < end <= rows per block).
struct BlockSpan {
  int64_t block;
  int64_t begin;
  int64_t end;
  int64_t rows() const { return end - begin; }
};

// How a packer's staging memory is obtained: ordinary memory for CPU caches,
// pinned host memory for CUDA caches (device<->host copies then run
// asynchronously, at full speed). Plain functions, not virtual calls, so that
// buffers may outlive the packer's derived part.
struct StagingAllocator {
  std::function<void*(int64_t bytes)> allocate;  // throws when it cannot
  std::function<void(void*)> release;
  // Take the largest size a buffer may need at once: freeing pinned memory
  // waits for the whole device (compute included), so it should happen once.
  bool whole_limit = false;
};

// A staging buffer, grown as needed, never shrunk; one thread at a time.
class StagingBuffer {
 public:
  explicit StagingBuffer(StagingAllocator allocator) : allocator_(std::move(allocator)) {}
  StagingBuffer(StagingBuffer&& other) noexcept
      : allocator_(std::move(other.allocator_)), data_(other.data_), capacity_(other.capacity_) {
    other.data_ = nullptr;
    other.capacity_ = 0;
  }
  StagingBuffer(const StagingBuffer&) = delete;
  StagingBuffer& operator=(const StagingBuffer&) = delete;
  StagingBuffer& operator=(StagingBuffer&&) = delete;
  ~StagingBuffer() { reset(); }

  // At least `bytes` (what it held before is not kept). It grows to twice
  // its size, up to `limit` (the largest a transfer can be), so that
  // transfers growing a little at a time reallocate rarely: pinning is slow.
  void* reserve(int64_t bytes, int64_t limit) {
    if (bytes <= capacity_) return data_;
    const int64_t grown =
        std::max(bytes, allocator_.whole_limit ? limit : std::min(2 * capacity_, limit));
    reset();
    data_ = allocator_.allocate(grown);
    capacity_ = grown;
    return data_;
  }
  int64_t capacity() const { return capacity_; }

 private:
  void reset() {
    if (data_) allocator_.release(data_);
    data_ = nullptr;
    capacity_ = 0;
  }

  StagingAllocator allocator_;
  void* data_ = nullptr;
  int64_t capacity_ = 0;
};

class BlockPacker {
 public:
  explicit BlockPacker(StagingAllocator staging)
      : staging_(staging), send_staging_(std::move(staging)) {}
  virtual ~BlockPacker() = default;
  virtual int64_t num_blocks() const = 0;
  virtual int64_t block_rows() const = 0;  // token rows per block
  // Bytes of one token row over every cache: what one row takes in a transfer.
  virtual int64_t row_bytes() const = 0;
  int64_t block_bytes() const { return block_rows() * row_bytes(); }

  // The write fence: called by submit(), on the submitting thread, once the
  // caller has issued the writes of the blocks it submits. A later pack()
  // reads them only once they are done (a CUDA packer records an event on
  // the caller's current stream and has its own stream wait for it); the
  // caller never waits. Caches written synchronously need nothing.
  virtual void fence() {}

  // staging: memory from this packer (send_staging / a ReceiveStaging).
  virtual void pack(const BlockSpan* spans, int64_t n, void* staging) = 0;
  // The rows are in the caches when unpack returns.
  virtual void unpack(const BlockSpan* spans, int64_t n, const void* staging) = 0;

  // The sending thread's staging buffer, at least `bytes` (see reserve).
  // Only one thread sends at a time.
  void* send_staging(int64_t bytes, int64_t limit) { return send_staging_.reserve(bytes, limit); }

  // A receive's staging buffer, borrowed for one receive. Receives on
  // several links may run at once (a thread each), each with a buffer of its
  // own; buffers are kept for the next receive, so a worker receiving on one
  // link holds one.
  class ReceiveStaging {
   public:
    explicit ReceiveStaging(BlockPacker& packer) : packer_(packer), buffer_(packer.take()) {}
    ~ReceiveStaging() { packer_.give_back(std::move(buffer_)); }
    ReceiveStaging(const ReceiveStaging&) = delete;
    ReceiveStaging& operator=(const ReceiveStaging&) = delete;
    void* reserve(int64_t bytes, int64_t limit) { return buffer_.reserve(bytes, limit); }

   private:
    BlockPacker& packer_;
    StagingBuffer buffer_;
  };

 private:
  StagingBuffer take() {
    std::lock_guard<std::mutex> lock(spare_mu_);
    if (spare_.empty()) return StagingBuffer(staging_);
    StagingBuffer b = std::move(spare_.back());
    spare_.pop_back();
    return b;
  }
  void give_back(StagingBuffer b) noexcept {
    try {
      std::lock_guard<std::mutex> lock(spare_mu_);
      spare_.push_back(std::move(b));
    } catch (...) {  // not kept: the next receive allocates again
    }
  }

  StagingAllocator staging_;
  StagingBuffer send_staging_;
  std::mutex spare_mu_;
  std::vector<StagingBuffer> spare_;  // receive buffers between receives
};

// CPU caches: the base pointers of same-shaped caches of num_blocks blocks of
// block_rows rows of cache_row_bytes each. `owner` keeps their memory alive
// as long as the packer. Packing is serial: the replication thread must not
// compete with the forward pass for cores.
std::unique_ptr<BlockPacker> make_cpu_packer(std::vector<void*> caches, int64_t num_blocks,
                                             int64_t block_rows, int64_t cache_row_bytes,
                                             std::shared_ptr<const void> owner);

// The same for caches on CUDA device `device` (cuda_packer.cpp, built only
// with a CUDA torch; without CUDA it throws std::invalid_argument).
std::unique_ptr<BlockPacker> make_cuda_packer(std::vector<void*> caches, int device,
                                              int64_t num_blocks, int64_t block_rows,
                                              int64_t cache_row_bytes,
                                              std::shared_ptr<const void> owner);

}  // namespace kevlarflow::replication
