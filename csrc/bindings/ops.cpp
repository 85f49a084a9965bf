// Schemas of torch.ops.kevlarflow.* and their CPU implementations. Mutated
// arguments are annotated (a!) so torch.compile and functionalization know.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_args.h"

namespace kevlarflow {
namespace {

void torch_parallel_for(int64_t n, int64_t grain,
                        const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, n, grain, body);
}

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cpu(), op, ": expected CPU tensors, got one on ", t.device());
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           double scale, int64_t sliding_window, int64_t max_query_len) {
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  const PagedAttentionArgs args = paged_attention_args(
      out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
      sliding_window, max_query_len);
  paged_attention_cpu(args, torch_parallel_for);
  return out;
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping, bool trusted) {
  const ReshapeAndCacheArgs args =
      reshape_and_cache_args(key, value, key_cache, value_cache, slot_mapping, trusted);
  reshape_and_cache_cpu(args, torch_parallel_for);
}

// A checked list of CPU caches, and the kernels' view of it.
struct CpuCaches {
  std::vector<at::Tensor> tensors;
  std::vector<void*> ptrs;
  BlockCaches view;

  CpuCaches(at::TensorList list, const char* op) : tensors(list.vec()) {
    const int64_t block_bytes = check_block_caches(tensors, op);
    check_cpu(tensors[0], op);
    for (const at::Tensor& t : tensors) ptrs.push_back(t.data_ptr());
    view = BlockCaches{ptrs.data(), int64_t(ptrs.size()), block_bytes};
  }
};

void copy_blocks(at::TensorList caches_in, const at::Tensor& block_mapping) {
  const CpuCaches caches(caches_in, "copy_blocks");
  check_block_mapping(block_mapping, caches.tensors[0]);
  copy_blocks_cpu(caches.view, block_mapping.data_ptr<int64_t>(), block_mapping.size(0),
                  torch_parallel_for);
}

void pack_blocks(at::TensorList caches_in, const at::Tensor& block_ids, at::Tensor& staging) {
  const CpuCaches caches(caches_in, "pack_blocks");
  check_block_ids(block_ids, caches.tensors[0], /*unique=*/false);
  check_staging(staging, caches.tensors, block_ids);
  pack_blocks_cpu(caches.view, block_ids.data_ptr<int64_t>(), block_ids.numel(),
                  staging.data_ptr(), torch_parallel_for);
}

void unpack_blocks(const at::Tensor& staging, const at::Tensor& block_ids,
                   at::TensorList caches_in) {
  const CpuCaches caches(caches_in, "unpack_blocks");
  check_block_ids(block_ids, caches.tensors[0], /*unique=*/true);
  check_staging(staging, caches.tensors, block_ids);
  unpack_blocks_cpu(caches.view, block_ids.data_ptr<int64_t>(), block_ids.numel(),
                    staging.data_ptr(), torch_parallel_for);
}

}  // namespace

TORCH_LIBRARY(kevlarflow, m) {
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale, int sliding_window=0, "
      "int max_query_len=-1) -> Tensor");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, bool trusted=False) -> ()");
  m.def("copy_blocks(Tensor(a!)[] caches, Tensor block_mapping) -> ()");
  m.def("pack_blocks(Tensor[] caches, Tensor block_ids, Tensor(a!) staging) -> ()");
  m.def("unpack_blocks(Tensor staging, Tensor block_ids, Tensor(a!)[] caches) -> ()");
}

TORCH_LIBRARY_IMPL(kevlarflow, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("copy_blocks", &copy_blocks);
  m.impl("pack_blocks", &pack_blocks);
  m.impl("unpack_blocks", &unpack_blocks);
}

}  // namespace kevlarflow
