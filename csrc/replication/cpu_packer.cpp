#include <stdexcept>
#include <utility>

#include "block_packer.h"
#include "cache_ops.h"

namespace kevlarflow::replication {
namespace {

class CpuPacker final : public BlockPacker {
 public:
  CpuPacker(std::vector<void*> caches, int64_t num_blocks, int64_t cache_block_bytes,
            std::shared_ptr<const void> owner)
      : ptrs_(std::move(caches)), num_blocks_(num_blocks),
        cache_block_bytes_(cache_block_bytes), owner_(std::move(owner)) {}

  int64_t num_blocks() const override { return num_blocks_; }
  int64_t block_bytes() const override {
    return cache_block_bytes_ * static_cast<int64_t>(ptrs_.size());
  }

  void pack(const int64_t* ids, int64_t n, void* staging) override {
    pack_blocks_cpu(caches(), ids, n, staging, serial_for);
  }

  void unpack(const int64_t* ids, int64_t n, const void* staging) override {
    unpack_blocks_cpu(caches(), ids, n, staging, serial_for);
  }

 private:
  BlockCaches caches() const {
    return BlockCaches{ptrs_.data(), static_cast<int64_t>(ptrs_.size()), cache_block_bytes_};
  }

  std::vector<void*> ptrs_;
  int64_t num_blocks_;
  int64_t cache_block_bytes_;
  std::shared_ptr<const void> owner_;
};

}  // namespace

std::unique_ptr<BlockPacker> make_cpu_packer(std::vector<void*> caches, int64_t num_blocks,
                                             int64_t cache_block_bytes,
                                             std::shared_ptr<const void> owner) {
  if (caches.empty()) throw std::invalid_argument("KVReplicator: no caches");
  if (num_blocks < 1) throw std::invalid_argument("KVReplicator: caches hold no block");
  if (cache_block_bytes < 1) throw std::invalid_argument("KVReplicator: empty blocks");
  return std::make_unique<CpuPacker>(std::move(caches), num_blocks, cache_block_bytes,
                                     std::move(owner));
}

}  // namespace kevlarflow::replication
