// CPU cache ops: plain byte copies, parallel over tokens or blocks.
#include <cstring>

#include "cache_ops.h"

namespace kevlarflow {

void reshape_and_cache_cpu(const ReshapeAndCacheArgs& a, const ParallelFor& parallel_for) {
  const int64_t row_bytes = a.row_numel * a.elem_size;
  const auto* key = static_cast<const char*>(a.key);
  const auto* value = static_cast<const char*>(a.value);
  auto* key_cache = static_cast<char*>(a.key_cache);
  auto* value_cache = static_cast<char*>(a.value_cache);
  parallel_for(a.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = a.slot_mapping[t];
      if (slot < 0) continue;  // padding token
      std::memcpy(key_cache + slot * row_bytes, key + t * a.key_stride * a.elem_size, row_bytes);
      std::memcpy(value_cache + slot * row_bytes, value + t * a.value_stride * a.elem_size,
                  row_bytes);
    }
  });
}

void copy_blocks_cpu(const BlockCaches& c, const int64_t* block_mapping, int64_t num_pairs,
                     const ParallelFor& parallel_for) {
  parallel_for(num_pairs * c.num_caches, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pair = i / c.num_caches, cache = i % c.num_caches;
      char* base = static_cast<char*>(c.ptrs[cache]);
      std::memcpy(base + block_mapping[2 * pair + 1] * c.block_bytes,
                  base + block_mapping[2 * pair] * c.block_bytes, c.block_bytes);
    }
  });
}

void pack_blocks_cpu(const BlockCaches& c, const int64_t* ids, int64_t num_ids, void* staging,
                     const ParallelFor& parallel_for) {
  auto* out = static_cast<char*>(staging);
  parallel_for(num_ids * c.num_caches, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // i = block index * num_caches + cache
      const int64_t block = ids[i / c.num_caches], cache = i % c.num_caches;
      std::memcpy(out + i * c.block_bytes,
                  static_cast<const char*>(c.ptrs[cache]) + block * c.block_bytes, c.block_bytes);
    }
  });
}

void unpack_blocks_cpu(const BlockCaches& c, const int64_t* ids, int64_t num_ids,
                       const void* staging, const ParallelFor& parallel_for) {
  const auto* in = static_cast<const char*>(staging);
  parallel_for(num_ids * c.num_caches, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t block = ids[i / c.num_caches], cache = i % c.num_caches;
      std::memcpy(static_cast<char*>(c.ptrs[cache]) + block * c.block_bytes,
                  in + i * c.block_bytes, c.block_bytes);
    }
  });
}

}  // namespace kevlarflow
