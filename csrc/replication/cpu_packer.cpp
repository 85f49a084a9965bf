#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <utility>

#include "block_packer.h"

namespace kevlarflow::replication {
namespace {

StagingAllocator ordinary_memory() {
  return {[](int64_t bytes) {
            void* p = std::malloc(static_cast<size_t>(bytes));
            if (!p) throw std::bad_alloc();
            return p;
          },
          [](void* p) { std::free(p); }};
}

class CpuPacker final : public BlockPacker {
 public:
  CpuPacker(std::vector<void*> caches, int64_t num_blocks, int64_t block_rows,
            int64_t cache_row_bytes, std::shared_ptr<const void> owner)
      : BlockPacker(ordinary_memory()), ptrs_(std::move(caches)), num_blocks_(num_blocks),
        block_rows_(block_rows), cache_row_bytes_(cache_row_bytes), owner_(std::move(owner)) {}

  int64_t num_blocks() const override { return num_blocks_; }
  int64_t block_rows() const override { return block_rows_; }
  int64_t row_bytes() const override {
    return cache_row_bytes_ * static_cast<int64_t>(ptrs_.size());
  }

  void pack(const BlockSpan* spans, int64_t n, void* staging) override {
    auto* out = static_cast<char*>(staging);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t bytes = spans[i].rows() * cache_row_bytes_;
      for (void* cache : ptrs_) {
        std::memcpy(out, static_cast<const char*>(cache) + offset(spans[i]), bytes);
        out += bytes;
      }
    }
  }

  void unpack(const BlockSpan* spans, int64_t n, const void* staging) override {
    const auto* in = static_cast<const char*>(staging);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t bytes = spans[i].rows() * cache_row_bytes_;
      for (void* cache : ptrs_) {
        std::memcpy(static_cast<char*>(cache) + offset(spans[i]), in, bytes);
        in += bytes;
      }
    }
  }

 private:
  int64_t offset(const BlockSpan& s) const {
    return (s.block * block_rows_ + s.begin) * cache_row_bytes_;
  }

  std::vector<void*> ptrs_;
  int64_t num_blocks_;
  int64_t block_rows_;
  int64_t cache_row_bytes_;
  std::shared_ptr<const void> owner_;
};

}  // namespace

std::unique_ptr<BlockPacker> make_cpu_packer(std::vector<void*> caches, int64_t num_blocks,
                                             int64_t block_rows, int64_t cache_row_bytes,
                                             std::shared_ptr<const void> owner) {
  if (caches.empty()) throw std::invalid_argument("KVReplicator: no caches");
  if (num_blocks < 1) throw std::invalid_argument("KVReplicator: caches hold no block");
  if (block_rows < 1 || cache_row_bytes < 1)
    throw std::invalid_argument("KVReplicator: empty blocks");
  return std::make_unique<CpuPacker>(std::move(caches), num_blocks, block_rows, cache_row_bytes,
                                     std::move(owner));
}

}  // namespace kevlarflow::replication
