// KV-cache block operations. A cache tensor is [num_blocks, block_size,
// num_kv_heads, head_dim]; only its per-block element count matters here, so
// every op sees a cache as num_blocks rows of block_numel elements.
#pragma once
#include <cstdint>

#include "parallel.h"

namespace kevlarflow {

// Write each token's K and V rows into its slot (block * block_size + offset).
// Tokens whose slot is negative are skipped (padding).
struct ReshapeAndCacheArgs {
  const void* key;            // [num_tokens, row_numel] with row stride key_stride
  const void* value;          // [num_tokens, row_numel] with row stride value_stride
  void* key_cache;
  void* value_cache;
  const int64_t* slot_mapping;  // [num_tokens]
  int64_t num_tokens = 0;
  int64_t row_numel = 0;        // num_kv_heads * head_dim
  int64_t key_stride = 0;       // elements between consecutive tokens
  int64_t value_stride = 0;
  int64_t elem_size = 0;        // bytes per element
};

// A list of same-shaped caches (typically K and V of every layer).
struct BlockCaches {
  void* const* ptrs;          // num_caches base pointers
  int64_t num_caches = 0;
  int64_t block_bytes = 0;    // bytes of one block of one cache
};

void reshape_and_cache_cpu(const ReshapeAndCacheArgs& args, const ParallelFor& parallel_for);

// Copy block src -> dst in every cache, for each (src, dst) pair of
// block_mapping [num_pairs, 2]. The bindings require distinct destinations
// that are not also sources, so the order of the copies cannot matter.
void copy_blocks_cpu(const BlockCaches& caches, const int64_t* block_mapping,
                     int64_t num_pairs, const ParallelFor& parallel_for);

// staging is block-major: [num_ids, num_caches, block_bytes]. Packing gathers
// block ids[i] of cache c into staging[i][c]; unpacking scatters it back.
void pack_blocks_cpu(const BlockCaches& caches, const int64_t* ids, int64_t num_ids,
                     void* staging, const ParallelFor& parallel_for);
void unpack_blocks_cpu(const BlockCaches& caches, const int64_t* ids, int64_t num_ids,
                       const void* staging, const ParallelFor& parallel_for);

// CUDA versions (cache_ops_cuda.cu); stream is a cudaStream_t. The pointer
// arrays and index arrays (ptrs, ids, block_mapping, slot_mapping) are device
// memory; staging may be device memory or pinned, device-mapped host memory.
void reshape_and_cache_cuda(const ReshapeAndCacheArgs& args, void* stream);
void copy_blocks_cuda(const BlockCaches& caches, const int64_t* block_mapping,
                      int64_t num_pairs, void* stream);
void pack_blocks_cuda(const BlockCaches& caches, const int64_t* ids, int64_t num_ids,
                      void* staging, void* stream);
void unpack_blocks_cuda(const BlockCaches& caches, const int64_t* ids, int64_t num_ids,
                        const void* staging, void* stream);

}  // namespace kevlarflow
