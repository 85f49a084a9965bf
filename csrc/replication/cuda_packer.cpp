// The packer of CUDA caches (built only with a CUDA torch; block_packer.h
// says what a packer does). Replicas travel through host memory: staging is
// pinned and mapped, and one kernel launch copies every span of every cache
// between it and the caches (span_copy_cuda.cu), on a stream of the
// packer's own: one for packing (the sending thread), one for unpacking (the
// receiving threads). Each pack or unpack waits for its stream before it
// returns; the caller's (compute) stream never waits for either.
//
// The write fence: submit() runs on the compute thread right after the
// forward pass has queued its KV writes, which may still be running. fence()
// records an event on that thread's current stream; the next pack has the
// packing stream wait for it (cudaStreamWaitEvent) before it reads. A fence
// on a stream that already has one pending re-records that event (a later
// point of the same stream covers the earlier one); fences on other streams
// get events of their own, so writes queued on several streams are all
// waited for. Events go back to a pool once a pack has queued its wait: a
// wait is on the record current when it was queued, so re-recording the
// event later does not move it.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "block_packer.h"
#include "span_copy.h"

namespace kevlarflow::replication {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("KVReplicator (CUDA): ") + what + ": " +
                             cudaGetErrorString(err));
}

// Pinned host memory, mapped into the device address space (the kernels
// read and write it directly) and portable (pinned for every device).
// whole_limit: staging buffers are allocated once at their largest size.
StagingAllocator pinned_memory(int device, bool whole_limit) {
  return {[device](int64_t bytes) {
            const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
            void* p = nullptr;
            check(cudaHostAlloc(&p, static_cast<size_t>(bytes),
                                cudaHostAllocPortable | cudaHostAllocMapped),
                  "cudaHostAlloc of staging");
            return p;
          },
          [](void* p) { (void)cudaFreeHost(p); }, whole_limit};
}

template <typename T>
T* device_view(void* host) {
  void* device = nullptr;
  check(cudaHostGetDevicePointer(&device, host, 0), "cudaHostGetDevicePointer");
  return static_cast<T*>(device);
}

// A stream of the packer's own and an event marking the end of its work: a
// blocking-sync event, so that the thread waiting for it sleeps instead of
// spinning on a core the forward pass may need.
struct OwnStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  StagingBuffer table;  // the spans of the copy in flight (pinned, read by the kernel)
  std::mutex mu;        // one copy at a time: the table and `done` are the stream's

  explicit OwnStream(int device) : table(pinned_memory(device, false)) {}

  void create() {
    // Non-blocking: no implicit ordering with the legacy default stream,
    // which may be the compute stream; the fence orders what must be.
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaEventCreateWithFlags(&done, cudaEventBlockingSync | cudaEventDisableTiming),
          "cudaEventCreate");
  }
  void destroy() {
    if (done) (void)cudaEventDestroy(done);
    if (stream) (void)cudaStreamDestroy(stream);
    done = nullptr;
    stream = nullptr;
  }
  void finish(const char* what) {
    check(cudaEventRecord(done, stream), what);
    check(cudaEventSynchronize(done), what);
  }
};

class CudaPacker final : public BlockPacker {
 public:
  CudaPacker(std::vector<void*> caches, int device, int64_t num_blocks, int64_t block_rows,
             int64_t cache_row_bytes, std::shared_ptr<const void> owner)
      : BlockPacker(pinned_memory(device, true)), num_caches_(static_cast<int64_t>(caches.size())),
        device_(static_cast<c10::DeviceIndex>(device)), num_blocks_(num_blocks),
        block_rows_(block_rows), cache_row_bytes_(cache_row_bytes), owner_(std::move(owner)),
        pack_(device), unpack_(device) {
    const c10::cuda::CUDAGuard guard(device_);
    try {
      pack_.create();
      unpack_.create();
      // On the packer's own stream: a plain cudaMemcpy would wait for the
      // compute stream (the legacy default stream) to drain.
      const size_t bytes = caches.size() * sizeof(void*);
      check(cudaMalloc(&caches_, bytes), "cudaMalloc of the cache pointers");
      check(cudaMemcpyAsync(caches_, caches.data(), bytes, cudaMemcpyHostToDevice, pack_.stream),
            "cudaMemcpy of the cache pointers");
      check(cudaStreamSynchronize(pack_.stream), "cudaMemcpy of the cache pointers");
    } catch (...) {
      release();
      throw;
    }
  }

  ~CudaPacker() override { release(); }

  int64_t num_blocks() const override { return num_blocks_; }
  int64_t block_rows() const override { return block_rows_; }
  int64_t row_bytes() const override { return cache_row_bytes_ * num_caches_; }

  void fence() override {
    // The caches' device current: the default stream's handle (0) names the
    // current device's, and an event belongs to the device it is made on.
    const c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_).stream();
    std::lock_guard<std::mutex> lock(fence_mu_);
    for (const Fence& f : fences_) {
      if (f.stream == stream) {
        check(cudaEventRecord(f.event, stream), "cudaEventRecord of the write fence");
        return;
      }
    }
    cudaEvent_t event = nullptr;
    if (!spare_events_.empty()) {
      event = spare_events_.back();
      spare_events_.pop_back();
    } else {
      check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    }
    const cudaError_t err = cudaEventRecord(event, stream);
    if (err != cudaSuccess) spare_events_.push_back(event);
    check(err, "cudaEventRecord of the write fence");
    fences_.push_back(Fence{stream, event});
  }

  void pack(const BlockSpan* spans, int64_t n, void* staging) override {
    if (n <= 0) return;
    std::lock_guard<std::mutex> lock(pack_.mu);
    const c10::cuda::CUDAGuard guard(device_);
    const SpanCopyArgs args = copy_args(spans, n, pack_, staging);
    wait_for_fences(pack_.stream);
    pack_spans_cuda(args, pack_.stream);
    pack_.finish("packing");
  }

  void unpack(const BlockSpan* spans, int64_t n, const void* staging) override {
    if (n <= 0) return;
    std::lock_guard<std::mutex> lock(unpack_.mu);
    const c10::cuda::CUDAGuard guard(device_);
    // The kernel only reads staging when unpacking.
    const SpanCopyArgs args = copy_args(spans, n, unpack_, const_cast<void*>(staging));
    unpack_spans_cuda(args, unpack_.stream);
    // Done before the receive returns: the blocks may become live right after.
    unpack_.finish("unpacking");
  }

 private:
  struct Fence {
    cudaStream_t stream;
    cudaEvent_t event;
  };

  // With s.mu held: s's table is free (its last copy is done).
  SpanCopyArgs copy_args(const BlockSpan* spans, int64_t n, OwnStream& s, void* staging) {
    const int64_t table_bytes = n * static_cast<int64_t>(sizeof(SpanRows));
    auto* table = static_cast<SpanRows*>(s.table.reserve(table_bytes, 2 * table_bytes));
    int64_t staged = 0;
    for (int64_t i = 0; i < n; ++i) {
      table[i] = SpanRows{spans[i].block, spans[i].begin, spans[i].rows(), staged};
      staged += spans[i].rows();
    }
    SpanCopyArgs args;
    args.caches = caches_;
    args.num_caches = num_caches_;
    args.block_rows = block_rows_;
    args.row_bytes = cache_row_bytes_;
    args.spans = device_view<const SpanRows>(table);
    args.num_spans = n;
    args.staging = device_view<void>(staging);
    return args;
  }

  // Work queued on `stream` from now on waits for every write fenced so far.
  void wait_for_fences(cudaStream_t stream) {
    std::vector<Fence> fences;
    {
      std::lock_guard<std::mutex> lock(fence_mu_);
      fences.swap(fences_);
    }
    cudaError_t err = cudaSuccess;
    for (const Fence& f : fences) {
      if (err == cudaSuccess) err = cudaStreamWaitEvent(stream, f.event, 0);
    }
    {
      std::lock_guard<std::mutex> lock(fence_mu_);
      for (const Fence& f : fences) spare_events_.push_back(f.event);
    }
    check(err, "cudaStreamWaitEvent on the write fence");
  }

  // Errors are ignored: this may run while the process exits, after CUDA.
  // Events still pending on a caller's stream are freed once reached.
  void release() {
    pack_.destroy();
    unpack_.destroy();
    for (const Fence& f : fences_) (void)cudaEventDestroy(f.event);
    for (cudaEvent_t e : spare_events_) (void)cudaEventDestroy(e);
    fences_.clear();
    spare_events_.clear();
    if (caches_) (void)cudaFree(caches_);
    caches_ = nullptr;
  }

  const int64_t num_caches_;
  const c10::DeviceIndex device_;
  const int64_t num_blocks_, block_rows_, cache_row_bytes_;
  std::shared_ptr<const void> owner_;
  void** caches_ = nullptr;  // device memory: the caches' base pointers
  OwnStream pack_, unpack_;
  std::mutex fence_mu_;
  std::vector<Fence> fences_;              // recorded, not yet waited for by a pack
  std::vector<cudaEvent_t> spare_events_;  // waited for: free to record again
};

}  // namespace

std::unique_ptr<BlockPacker> make_cuda_packer(std::vector<void*> caches, int device,
                                              int64_t num_blocks, int64_t block_rows,
                                              int64_t cache_row_bytes,
                                              std::shared_ptr<const void> owner) {
  if (caches.empty()) throw std::invalid_argument("KVReplicator: no caches");
  if (num_blocks < 1) throw std::invalid_argument("KVReplicator: caches hold no block");
  if (block_rows < 1 || cache_row_bytes < 1)
    throw std::invalid_argument("KVReplicator: empty blocks");
  if (device < 0) throw std::invalid_argument("KVReplicator: no CUDA device index");
  return std::make_unique<CudaPacker>(std::move(caches), device, num_blocks, block_rows,
                                      cache_row_bytes, std::move(owner));
}

}  // namespace kevlarflow::replication
