// Paged attention over a mixed batch: every sequence contributes a chunk of
// query tokens (1 for decode, more for prefill-with-context). The chunk's own
// K/V must already be in the cache; query token j of a sequence with context
// length L and chunk length n sits at position L - n + j and attends causally
// to keys [max(0, pos - window + 1), pos].
#pragma once
#include <cstdint>

#include "dtypes.h"
#include "parallel.h"

namespace kevlarflow {

struct PagedAttentionArgs {
  void* out;                        // [num_tokens, num_heads, head_dim], contiguous
  const void* query;                // [num_tokens, num_heads, head_dim], contiguous
  const void* key_cache;            // [num_blocks, block_size, num_kv_heads, head_dim]
  const void* value_cache;          // same shape as key_cache
  const int32_t* block_tables;      // [num_seqs, max_blocks_per_seq]
  const int32_t* seq_lens;          // [num_seqs]: context length incl. the chunk
  const int32_t* query_start_loc;   // [num_seqs + 1]: chunk offsets into query
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 0;
  int64_t num_blocks = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t max_query_len = 0;        // longest chunk in the batch (sizes the CUDA grid)
  int64_t sliding_window = 0;       // <= 0: attend to the whole context
  float scale = 1.f;
  DType dtype = DType::kFloat32;    // of query, caches and out alike
  // CUDA only (the CPU kernel ignores them): fp32 scratch for the per-partition
  // partial results, sized by paged_attention_cuda_workspace_floats.
  float* workspace = nullptr;
  int64_t workspace_floats = 0;
};

// Arguments are assumed valid: the bindings check them first.
void paged_attention_cpu(const PagedAttentionArgs& args, const ParallelFor& parallel_for);

// The CPU variant paged_attention_cpu runs here: "avx2" or "generic".
const char* paged_attention_cpu_isa();

// Defined in paged_attention_cuda.cu; stream is a cudaStream_t. args.workspace
// must hold paged_attention_cuda_workspace_floats(args) floats on the op's
// device; the caller allocates it (so that it comes from torch's allocator).
void paged_attention_cuda(const PagedAttentionArgs& args, void* stream);
int64_t paged_attention_cuda_workspace_floats(const PagedAttentionArgs& args);

}  // namespace kevlarflow
