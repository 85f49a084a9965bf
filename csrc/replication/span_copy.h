// The CUDA packer's copies (span_copy_cuda.cu): every span's rows of every
// cache to or from the staging buffer, in one kernel launch. Torch-free and
// CUDA-free here (streams are void*), like csrc/kernels/cache_ops.h.
#pragma once
#include <cstdint>

namespace kevlarflow::replication {

// A span (block_packer.h) and its place in the span-major staging layout.
struct SpanRows {
  int64_t block;
  int64_t begin;        // first row
  int64_t rows;
  int64_t staged_rows;  // rows of the spans before it in the transfer
};

struct SpanCopyArgs {
  void* const* caches;    // num_caches base pointers, in device memory
  int64_t num_caches = 0;
  int64_t block_rows = 0;
  int64_t row_bytes = 0;  // one row of one cache
  const SpanRows* spans;  // num_spans, device-accessible (pinned host memory will do)
  int64_t num_spans = 0;
  void* staging;          // device-accessible: pinned host memory, mapped
};

// Launch on `stream` (a cudaStream_t); throw std::runtime_error when the
// launch fails. The copies are done when the stream has reached them.
void pack_spans_cuda(const SpanCopyArgs& args, void* stream);
void unpack_spans_cuda(const SpanCopyArgs& args, void* stream);

}  // namespace kevlarflow::replication
