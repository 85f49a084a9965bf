// CUDA paged attention (semantics: kevlarflow/reference.py::paged_attention):
// the launcher. It checks the arguments, sizes the workspace and the grids,
// and picks the kernels' template parameters; the kernels, how they split the
// work and how they keep a token's bits independent of the batch, are in
// paged_attention_cuda_kernels.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "paged_attention.h"
#include "paged_attention_cuda_kernels.cuh"

namespace kevlarflow {
namespace {

using namespace paged_attention_kernels;

// The most workspace one call allocates. Larger batches (long prefill chunks
// over long contexts) run as several launches over consecutive token ranges;
// a row's arithmetic does not depend on which launch computes it.
constexpr int64_t kWorkspaceBudgetBytes = int64_t(256) << 20;

void fail(const std::string& what) { throw std::runtime_error("paged_attention_cuda: " + what); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(err));
}

constexpr int64_t kMaxGridY = 65535;  // larger row counts loop inside the kernels

int64_t num_partitions(const PagedAttentionArgs& args) {
  // The table's width bounds every context (the bindings check it, and the
  // engine sizes the table to the batch), so no index tensor is read here.
  // Positions are int32, whatever the table's width.
  const int64_t max_keys =
      std::min<int64_t>(args.max_blocks_per_seq * args.block_size, INT32_MAX);
  return std::max<int64_t>(1, (max_keys + kPartitionKeys - 1) / kPartitionKeys);
}

int64_t workspace_floats_per_token(const PagedAttentionArgs& args) {
  return args.num_heads * num_partitions(args) * (args.head_dim + 2);
}

template <typename T, int D_PAD, int ROWS>
void launch_partitions(const PagedAttentionArgs& args, const Launch& launch, int64_t rows_per_seq,
                       cudaStream_t stream) {
  using L = PartitionLayout<T, D_PAD, ROWS>;
  const auto kernel = partition_kernel<T, D_PAD, ROWS>;
  constexpr size_t kSmem = L::kBytes;
  if (kSmem > 48 * 1024) {  // past the default: opt in (the limit is per device)
    int device = 0, limit = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
          "cudaDeviceGetAttribute");
    if (kSmem > size_t(limit))
      fail("needs " + std::to_string(kSmem) + " bytes of shared memory per block for this head " +
           "size and dtype; the device allows " + std::to_string(limit));
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(kSmem)),
          "cudaFuncSetAttribute");
  }
  const int64_t row_blocks = std::min((rows_per_seq + ROWS - 1) / ROWS, kMaxGridY);
  const dim3 grid(static_cast<unsigned>(args.num_seqs * launch.num_partitions),
                  static_cast<unsigned>(row_blocks), static_cast<unsigned>(args.num_kv_heads));
  kernel<<<grid, kThreads, kSmem, stream>>>(args, launch);
}

template <typename T, int D_PAD>
void launch_merge(const PagedAttentionArgs& args, const Launch& launch, int64_t tokens,
                  cudaStream_t stream) {
  const int64_t rows = tokens * args.num_heads;
  const int64_t row_blocks = std::min((rows + kNumWarps - 1) / kNumWarps, kMaxGridY);
  const dim3 grid(static_cast<unsigned>(args.num_seqs), static_cast<unsigned>(row_blocks));
  merge_kernel<T, D_PAD><<<grid, kThreads, 0, stream>>>(args, launch);
}

// Rows per CTA, from the longest chunk: a decode CTA holds one KV group, a
// prefill CTA up to 32 rows, so that each K/V tile copied serves many rows.
// The choice changes the speed, never a bit of the result.
template <typename T, int D_PAD>
void dispatch_rows(const PagedAttentionArgs& args, const Launch& launch, cudaStream_t stream) {
  // Above 256 bytes per padded head row, 32 rows would not fit in shared memory.
  constexpr int kMaxRows = D_PAD * sizeof(T) <= 256 ? 32 : 16;
  const int64_t tokens = std::min(args.max_query_len, launch.token_end - launch.token_begin);
  const int64_t rows = tokens * (args.num_heads / args.num_kv_heads);
  if (rows <= 4) {
    launch_partitions<T, D_PAD, 4>(args, launch, rows, stream);
  } else if (rows <= 8) {
    launch_partitions<T, D_PAD, 8>(args, launch, rows, stream);
  } else if (rows <= 16) {
    launch_partitions<T, D_PAD, 16>(args, launch, rows, stream);
  } else {
    launch_partitions<T, D_PAD, kMaxRows>(args, launch, rows, stream);
  }
  launch_merge<T, D_PAD>(args, launch, tokens, stream);
}

template <typename T>
void run(const PagedAttentionArgs& args, cudaStream_t stream) {
  constexpr int64_t kChunkElems = 16 / sizeof(T);
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
  };
  Launch launch;
  launch.num_partitions = static_cast<int>(num_partitions(args));
  launch.workspace_tokens = args.workspace_floats / workspace_floats_per_token(args);
  launch.vectorized = args.head_dim % kChunkElems == 0 && aligned(args.key_cache) &&
                      aligned(args.value_cache);
  for (int64_t begin = 0; begin < args.num_tokens; begin += launch.workspace_tokens) {
    launch.token_begin = begin;
    launch.token_end = std::min(begin + launch.workspace_tokens, args.num_tokens);
    if (args.head_dim <= 64) {
      dispatch_rows<T, 64>(args, launch, stream);
    } else if (args.head_dim <= 128) {
      dispatch_rows<T, 128>(args, launch, stream);
    } else {
      dispatch_rows<T, 256>(args, launch, stream);
    }
  }
}

// Nothing to compute: no launch, no workspace.
bool nothing_to_do(const PagedAttentionArgs& args) {
  return args.num_seqs == 0 || args.num_tokens == 0 || args.num_heads == 0 ||
         args.max_query_len <= 0;
}

}  // namespace

int64_t paged_attention_cuda_workspace_floats(const PagedAttentionArgs& args) {
  if (nothing_to_do(args) || args.head_dim <= 0 || args.num_heads < 0) return 0;
  const int64_t per_token = workspace_floats_per_token(args);
  const int64_t budget_tokens = kWorkspaceBudgetBytes / (per_token * int64_t(sizeof(float)));
  return std::clamp<int64_t>(budget_tokens, 1, args.num_tokens) * per_token;
}

void paged_attention_cuda(const PagedAttentionArgs& args, void* stream) {
  if (nothing_to_do(args)) return;
  if (args.head_dim <= 0 || args.head_dim > kMaxHeadDim || args.head_dim % 8 != 0)
    fail("head_dim " + std::to_string(args.head_dim) + " is not a multiple of 8 in [8, 256]");
  if (args.num_kv_heads <= 0 || args.num_heads < 0 || args.num_heads % args.num_kv_heads != 0)
    fail("num_heads must be a multiple of num_kv_heads");
  if (args.num_kv_heads > 65535) fail("more than 65535 KV heads");
  if (args.block_size <= 0) fail("block_size must be positive");
  const int64_t partitions = num_partitions(args);
  if (args.num_seqs > 0x7fffffff / partitions)
    fail("too many sequences x context partitions for one launch");
  if (args.workspace == nullptr || args.workspace_floats < workspace_floats_per_token(args))
    fail("the workspace must hold paged_attention_cuda_workspace_floats(args) floats");

  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32:
      run<float>(args, cuda_stream);
      break;
    case DType::kBFloat16:
      run<__nv_bfloat16>(args, cuda_stream);
      break;
    case DType::kFloat16:
      run<__half>(args, cuda_stream);
      break;
    default:
      fail("unsupported dtype");
  }
  check(cudaGetLastError(), "kernel launch failed");
}

}  // namespace kevlarflow
