// The CUDA packer's copies (span_copy.h). A transfer may hold thousands of
// spans of one row each, so one warp (not one CTA) copies one (span, cache)
// range at a time, grid-stride over them, in the widest word the addresses
// and the length allow. Consecutive warps take the caches of one span:
// their staging ranges are adjacent, so writes to host memory stay
// sequential. Plain loads and stores, so staging may be pinned host memory
// mapped into the device address space.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "span_copy.h"

namespace kevlarflow::replication {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / kWarpSize;
constexpr int64_t kMaxCtas = 8192;  // ranges beyond this are picked up by the grid-stride loop

template <typename Word>
__device__ __forceinline__ void warp_copy_words(char* dst, const char* src, int64_t num_words,
                                                int lane) {
  Word* dst_words = reinterpret_cast<Word*>(dst);
  const Word* src_words = reinterpret_cast<const Word*>(src);
  for (int64_t i = lane; i < num_words; i += kWarpSize) dst_words[i] = src_words[i];
}

// The word size depends only on the arguments, the same for the whole warp.
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int64_t num_bytes,
                                          int lane) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                         static_cast<uintptr_t>(num_bytes);
  if (bits % 16 == 0) {
    warp_copy_words<uint4>(dst, src, num_bytes / 16, lane);
  } else if (bits % 8 == 0) {
    warp_copy_words<uint2>(dst, src, num_bytes / 8, lane);
  } else if (bits % 4 == 0) {
    warp_copy_words<uint32_t>(dst, src, num_bytes / 4, lane);
  } else if (bits % 2 == 0) {
    warp_copy_words<uint16_t>(dst, src, num_bytes / 2, lane);
  } else {
    warp_copy_words<uint8_t>(dst, src, num_bytes, lane);
  }
}

// Range item is span item / num_caches of cache item % num_caches; its
// staging offset follows block_packer.h's layout. Packing copies cache ->
// staging.
template <bool kPack>
__global__ void span_copy_kernel(const SpanCopyArgs args) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerCta;
  const int64_t num_items = args.num_spans * args.num_caches;
  for (int64_t item = first; item < num_items; item += stride) {
    const int64_t cache = item % args.num_caches;
    const SpanRows span = args.spans[item / args.num_caches];
    const int64_t bytes = span.rows * args.row_bytes;
    char* rows = static_cast<char*>(args.caches[cache]) +
                 (span.block * args.block_rows + span.begin) * args.row_bytes;
    char* staged = static_cast<char*>(args.staging) +
                   (span.staged_rows * args.num_caches + cache * span.rows) * args.row_bytes;
    if (kPack) {
      warp_copy(staged, rows, bytes, lane);
    } else {
      warp_copy(rows, staged, bytes, lane);
    }
  }
}

template <bool kPack>
void launch(const SpanCopyArgs& args, void* stream, const char* op) {
  if (args.num_spans <= 0 || args.num_caches <= 0 || args.row_bytes <= 0) return;
  const int64_t items = args.num_spans * args.num_caches;
  const auto ctas = static_cast<unsigned>(
      std::min((items + kWarpsPerCta - 1) / kWarpsPerCta, kMaxCtas));
  span_copy_kernel<kPack><<<ctas, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": kernel launch failed: " +
                             cudaGetErrorString(err));
}

}  // namespace

void pack_spans_cuda(const SpanCopyArgs& args, void* stream) {
  launch<true>(args, stream, "pack_spans_cuda");
}

void unpack_spans_cuda(const SpanCopyArgs& args, void* stream) {
  launch<false>(args, stream, "unpack_spans_cuda");
}

}  // namespace kevlarflow::replication
