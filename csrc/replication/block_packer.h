// Moving KV blocks between a worker's caches and a contiguous staging buffer:
// the unit one replication transfer carries. The staging layout is
// block-major over every cache ([n, num_caches, bytes of a block of a
// cache]). The CPU packer is here; a device packer (packing on a stream of
// its own into pinned host memory) implements the same interface.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace kevlarflow::replication {

class BlockPacker {
 public:
  virtual ~BlockPacker() = default;
  virtual int64_t num_blocks() const = 0;
  // Bytes of one block over every cache: what one block takes in a transfer.
  virtual int64_t block_bytes() const = 0;
  virtual void pack(const int64_t* ids, int64_t n, void* staging) = 0;
  virtual void unpack(const int64_t* ids, int64_t n, const void* staging) = 0;
};

// CPU caches: the base pointers of same-shaped caches of num_blocks blocks of
// cache_block_bytes each. `owner` keeps their memory alive as long as the
// packer. Packing is serial: the replication thread must not compete with
// the forward pass for cores.
std::unique_ptr<BlockPacker> make_cpu_packer(std::vector<void*> caches, int64_t num_blocks,
                                             int64_t cache_block_bytes,
                                             std::shared_ptr<const void> owner);

}  // namespace kevlarflow::replication
