// CUDA KV-cache block operations (semantics: cache_ops.h and
// kevlarflow/reference.py). Every op is a list of independent byte-range copies;
// one CTA copies one range at a time (grid-stride over ranges), its threads
// striding over the range in the widest word that the addresses and the length
// allow. Plain loads and stores only, so staging may be device memory or pinned
// host memory mapped into the device address space.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cache_ops.h"

namespace kevlarflow {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // ranges beyond this are picked up by the grid-stride loops

template <typename Word>
__device__ __forceinline__ void copy_words(char* dst, const char* src, int64_t num_words) {
  Word* dst_words = reinterpret_cast<Word*>(dst);
  const Word* src_words = reinterpret_cast<const Word*>(src);
  for (int64_t i = threadIdx.x; i < num_words; i += blockDim.x) dst_words[i] = src_words[i];
}

// Copies num_bytes with all threads of the CTA. The word size is the same for
// every thread (it depends only on the arguments), so the branch is uniform.
__device__ __forceinline__ void copy_bytes(char* dst, const char* src, int64_t num_bytes) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                         static_cast<uintptr_t>(num_bytes);
  if (bits % 16 == 0) {
    copy_words<uint4>(dst, src, num_bytes / 16);
  } else if (bits % 8 == 0) {
    copy_words<uint2>(dst, src, num_bytes / 8);
  } else if (bits % 4 == 0) {
    copy_words<uint32_t>(dst, src, num_bytes / 4);
  } else if (bits % 2 == 0) {
    copy_words<uint16_t>(dst, src, num_bytes / 2);
  } else {
    copy_words<uint8_t>(dst, src, num_bytes);
  }
}

__global__ void reshape_and_cache_kernel(const ReshapeAndCacheArgs args) {
  const int64_t row_bytes = args.row_numel * args.elem_size;
  const char* key = static_cast<const char*>(args.key);
  const char* value = static_cast<const char*>(args.value);
  char* key_cache = static_cast<char*>(args.key_cache);
  char* value_cache = static_cast<char*>(args.value_cache);
  for (int64_t token = blockIdx.x; token < args.num_tokens; token += gridDim.x) {
    const int64_t slot = args.slot_mapping[token];
    if (slot < 0) continue;  // padding token
    copy_bytes(key_cache + slot * row_bytes, key + token * args.key_stride * args.elem_size,
               row_bytes);
    copy_bytes(value_cache + slot * row_bytes, value + token * args.value_stride * args.elem_size,
               row_bytes);
  }
}

// One range per (pair, cache); consecutive CTAs take the caches of one pair.
__global__ void copy_blocks_kernel(const BlockCaches caches, const int64_t* block_mapping,
                                   int64_t num_pairs) {
  for (int64_t item = blockIdx.x; item < num_pairs * caches.num_caches; item += gridDim.x) {
    const int64_t pair = item / caches.num_caches;
    char* base = static_cast<char*>(caches.ptrs[item % caches.num_caches]);
    const int64_t src = block_mapping[2 * pair];
    const int64_t dst = block_mapping[2 * pair + 1];
    copy_bytes(base + dst * caches.block_bytes, base + src * caches.block_bytes,
               caches.block_bytes);
  }
}

// Item i * num_caches + c is block ids[i] of cache c, and also its index in
// the block-major staging buffer. Packing copies cache -> staging.
template <bool kPack>
__global__ void staging_kernel(const BlockCaches caches, const int64_t* ids, int64_t num_ids,
                               char* staging) {
  for (int64_t item = blockIdx.x; item < num_ids * caches.num_caches; item += gridDim.x) {
    char* block = static_cast<char*>(caches.ptrs[item % caches.num_caches]) +
                  ids[item / caches.num_caches] * caches.block_bytes;
    char* staged = staging + item * caches.block_bytes;
    if (kPack) {
      copy_bytes(staged, block, caches.block_bytes);
    } else {
      copy_bytes(block, staged, caches.block_bytes);
    }
  }
}

unsigned grid_for(int64_t num_ranges) {
  return static_cast<unsigned>(std::min(num_ranges, kMaxBlocks));
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) +
                             ": kernel launch failed: " + cudaGetErrorString(err));
}

}  // namespace

void reshape_and_cache_cuda(const ReshapeAndCacheArgs& args, void* stream) {
  if (args.num_tokens <= 0 || args.row_numel <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  reshape_and_cache_kernel<<<grid_for(args.num_tokens), kThreads, 0, s>>>(args);
  check_launch("reshape_and_cache_cuda");
}

void copy_blocks_cuda(const BlockCaches& caches, const int64_t* block_mapping, int64_t num_pairs,
                      void* stream) {
  if (num_pairs <= 0 || caches.num_caches <= 0 || caches.block_bytes <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  copy_blocks_kernel<<<grid_for(num_pairs * caches.num_caches), kThreads, 0, s>>>(
      caches, block_mapping, num_pairs);
  check_launch("copy_blocks_cuda");
}

void pack_blocks_cuda(const BlockCaches& caches, const int64_t* ids, int64_t num_ids, void* staging,
                      void* stream) {
  if (num_ids <= 0 || caches.num_caches <= 0 || caches.block_bytes <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  staging_kernel<true><<<grid_for(num_ids * caches.num_caches), kThreads, 0, s>>>(
      caches, ids, num_ids, static_cast<char*>(staging));
  check_launch("pack_blocks_cuda");
}

void unpack_blocks_cuda(const BlockCaches& caches, const int64_t* ids, int64_t num_ids,
                        const void* staging, void* stream) {
  if (num_ids <= 0 || caches.num_caches <= 0 || caches.block_bytes <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  // Unpacking only reads staging; the cast lets both directions share a kernel.
  staging_kernel<false><<<grid_for(num_ids * caches.num_caches), kThreads, 0, s>>>(
      caches, ids, num_ids, static_cast<char*>(const_cast<void*>(staging)));
  check_launch("unpack_blocks_cuda");
}

}  // namespace kevlarflow
