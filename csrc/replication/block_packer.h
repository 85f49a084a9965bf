// Moving KV between a worker's caches and a contiguous staging buffer: the
// unit one replication transfer carries. A transfer carries spans, runs of
// token rows of one block: a decode step adds one row to a block already
// sent, and only the new rows need to travel. The staging layout is
// span-major over every cache ([n, num_caches, rows of the span, row
// bytes]). The CPU packer is here; a device packer (packing on a stream of
// its own into pinned host memory) implements the same interface.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace kevlarflow::replication {

// Rows [begin, end) of block `block` (0 <= begin < end <= rows per block).
struct BlockSpan {
  int64_t block;
  int64_t begin;
  int64_t end;
  int64_t rows() const { return end - begin; }
};

class BlockPacker {
 public:
  virtual ~BlockPacker() = default;
  virtual int64_t num_blocks() const = 0;
  virtual int64_t block_rows() const = 0;  // token rows per block
  // Bytes of one token row over every cache: what one row takes in a transfer.
  virtual int64_t row_bytes() const = 0;
  int64_t block_bytes() const { return block_rows() * row_bytes(); }
  virtual void pack(const BlockSpan* spans, int64_t n, void* staging) = 0;
  virtual void unpack(const BlockSpan* spans, int64_t n, const void* staging) = 0;
};

// CPU caches: the base pointers of same-shaped caches of num_blocks blocks of
// block_rows rows of cache_row_bytes each. `owner` keeps their memory alive
// as long as the packer. Packing is serial: the replication thread must not
// compete with the forward pass for cores.
std::unique_ptr<BlockPacker> make_cpu_packer(std::vector<void*> caches, int64_t num_blocks,
                                             int64_t block_rows, int64_t cache_row_bytes,
                                             std::shared_ptr<const void> owner);

}  // namespace kevlarflow::replication
