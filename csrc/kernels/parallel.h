// The CPU kernels do not own a thread pool: the caller hands them one. The torch
// bindings pass at::parallel_for (so torch.set_num_threads caps them), the C++
// microbenchmarks pass a plain one.
#pragma once
#include <cstdint>
#include <functional>

namespace kevlarflow {

// Calls body(begin, end) over disjoint ranges covering [0, n), possibly in
// parallel; grain is the smallest range worth a task.
using ParallelFor = std::function<void(int64_t n, int64_t grain,
                                       const std::function<void(int64_t, int64_t)>& body)>;

inline void serial_for(int64_t n, int64_t /*grain*/,
                       const std::function<void(int64_t, int64_t)>& body) {
  if (n > 0) body(0, n);
}

}  // namespace kevlarflow
