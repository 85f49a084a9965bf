// The binding boundary: tensors in, checked kernel arguments out. Every
// check that protects a kernel from a bad call lives here, shared by the CPU
// and CUDA registrations, and fails with a message naming the argument.
#pragma once
#include <torch/library.h>

#include <vector>

#include "cache_ops.h"
#include "paged_attention.h"

namespace kevlarflow {

// Shapes, dtypes, devices and layouts are always checked. The contents of
// the index tensors (offsets, lengths, block ids, slots) are checked on a host
// copy, which on a GPU is a device synchronisation, unless the caller vouches
// for them: the engine, whose scheduler built the batch, passes the longest
// chunk (max_query_len >= 0) and trusted=true, and nothing is read back.
PagedAttentionArgs paged_attention_args(const at::Tensor& out, const at::Tensor& query,
                                        const at::Tensor& key_cache, const at::Tensor& value_cache,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                        const at::Tensor& query_start_loc, double scale,
                                        int64_t sliding_window, int64_t max_query_len);

ReshapeAndCacheArgs reshape_and_cache_args(const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
                                           const at::Tensor& slot_mapping, bool trusted);

// Checks a list of same-shaped caches and returns its bytes per block; the
// pointer array is filled by the caller (host or device memory).
int64_t check_block_caches(const std::vector<at::Tensor>& caches, const char* what);

void check_block_mapping(const at::Tensor& block_mapping, const at::Tensor& first_cache);
void check_block_ids(const at::Tensor& ids, const at::Tensor& first_cache, bool unique);
void check_staging(const at::Tensor& staging, const std::vector<at::Tensor>& caches,
                   const at::Tensor& ids);

}  // namespace kevlarflow
