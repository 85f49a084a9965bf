// CUDA implementations of torch.ops.kevlarflow.*. Built only when the
// installed torch has CUDA. Checks are shared with the CPU path (op_args.h);
// kernels run on the current stream of the tensors' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <stdexcept>

#include "op_args.h"

namespace kevlarflow {
namespace {

void* current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Runs a launcher and turns its std::runtime_error into a Python exception.
template <typename Fn>
void launch(const char* op, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": CUDA launch failed: ", e.what());
  }
}

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got one on ", t.device());
}

at::Device cuda_device_of(const at::Tensor& t, const char* op) {
  check_cuda(t, op);
  return t.device();
}

// The kernels read the caches' base pointers from device memory: written to
// pinned memory and copied without waiting (torch's pinned allocator keeps
// the host buffer until the copy is done).
at::Tensor device_pointers(const std::vector<at::Tensor>& caches) {
  at::Tensor ptrs = at::empty({int64_t(caches.size())},
                              at::TensorOptions(at::kLong).pinned_memory(true));
  for (size_t i = 0; i < caches.size(); ++i)
    ptrs.data_ptr<int64_t>()[i] = reinterpret_cast<int64_t>(caches[i].data_ptr());
  return ptrs.to(caches[0].device(), /*non_blocking=*/true);
}

// A checked list of CUDA caches, the device made current for the call, and
// the kernels' view of the list.
struct CudaCaches {
  std::vector<at::Tensor> tensors;
  int64_t block_bytes;
  c10::cuda::CUDAGuard guard;
  at::Tensor ptrs;
  BlockCaches view;

  CudaCaches(at::TensorList list, const char* op)
      : tensors(list.vec()),
        block_bytes(check_block_caches(tensors, op)),
        guard(cuda_device_of(tensors[0], op)),
        ptrs(device_pointers(tensors)),
        view{reinterpret_cast<void* const*>(ptrs.data_ptr<int64_t>()), int64_t(tensors.size()),
             block_bytes} {}

  void* stream() const { return current_stream(tensors[0]); }
};

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           double scale, int64_t sliding_window, int64_t max_query_len) {
  check_cuda(query, "paged_attention");
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  PagedAttentionArgs args = paged_attention_args(
      out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
      sliding_window, max_query_len);
  // The kernel's per-partition partials: from torch's caching allocator, on
  // query's device and current stream (the kernels' stream), so that it is
  // reused call after call without a cudaMalloc or a synchronisation. Its size
  // comes from shapes only (no index tensor is read).
  const at::Tensor workspace = at::empty({paged_attention_cuda_workspace_floats(args)},
                                         query.options().dtype(at::kFloat));
  args.workspace = workspace.data_ptr<float>();
  args.workspace_floats = workspace.numel();
  launch("paged_attention", [&] { paged_attention_cuda(args, current_stream(query)); });
  return out;
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping, bool trusted) {
  check_cuda(key, "reshape_and_cache");
  const c10::cuda::CUDAGuard guard(key.device());
  const ReshapeAndCacheArgs args =
      reshape_and_cache_args(key, value, key_cache, value_cache, slot_mapping, trusted);
  launch("reshape_and_cache", [&] { reshape_and_cache_cuda(args, current_stream(key)); });
}

void copy_blocks(at::TensorList caches_in, const at::Tensor& block_mapping) {
  const CudaCaches caches(caches_in, "copy_blocks");
  check_block_mapping(block_mapping, caches.tensors[0]);
  launch("copy_blocks", [&] {
    copy_blocks_cuda(caches.view, block_mapping.data_ptr<int64_t>(), block_mapping.size(0),
                     caches.stream());
  });
}

// A pinned host staging buffer is filled in two hops: the kernel gathers the
// blocks into device memory (at HBM speed), then one copy moves them over the
// link on a copy engine, at its full speed; SM stores through a mapped
// pointer reached only 81-94% of it. Unpacking mirrors it. The device buffer
// comes from torch's caching allocator on the current stream, which orders
// its reuse after the copy.
void pack_blocks(at::TensorList caches_in, const at::Tensor& block_ids, at::Tensor& staging) {
  const CudaCaches caches(caches_in, "pack_blocks");
  check_block_ids(block_ids, caches.tensors[0], /*unique=*/false);
  check_staging(staging, caches.tensors, block_ids);
  at::Tensor gathered =
      staging.is_cuda() ? staging : at::empty(staging.sizes(), caches.tensors[0].options());
  launch("pack_blocks", [&] {
    pack_blocks_cuda(caches.view, block_ids.data_ptr<int64_t>(), block_ids.numel(),
                     gathered.data_ptr(), caches.stream());
  });
  if (!staging.is_cuda()) staging.copy_(gathered, /*non_blocking=*/true);
}

void unpack_blocks(const at::Tensor& staging, const at::Tensor& block_ids,
                   at::TensorList caches_in) {
  const CudaCaches caches(caches_in, "unpack_blocks");
  check_block_ids(block_ids, caches.tensors[0], /*unique=*/true);
  check_staging(staging, caches.tensors, block_ids);
  const at::Tensor on_device =
      staging.is_cuda() ? staging : staging.to(caches.tensors[0].device(), /*non_blocking=*/true);
  launch("unpack_blocks", [&] {
    unpack_blocks_cuda(caches.view, block_ids.data_ptr<int64_t>(), block_ids.numel(),
                       on_device.data_ptr(), caches.stream());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kevlarflow, CUDA, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("copy_blocks", &copy_blocks);
  m.impl("pack_blocks", &pack_blocks);
  m.impl("unpack_blocks", &unpack_blocks);
}

}  // namespace kevlarflow
