// The NCCL transport: a non-blocking NCCL communicator whose every call
// returns at once; init and ops are polled against the deadline, and a
// communicator that misses it is aborted (ncclCommAbort, on the reaper
// thread). Ops run on a CUDA stream of the communicator's own, after the
// compute stream's queued work (nccl_work.h).
#pragma once
#include <memory>
#include <string>

#include "transport.h"

namespace kevlarflow::comm {

// A fresh ncclUniqueId (128 bytes), for rank 0 of a new generation to publish.
std::string nccl_unique_id();

// Joins the communicator `unique_id` as `rank` of `size` on CUDA `device`.
// Throws TransportError (kTimeout when init misses `timeout`), or
// std::runtime_error when NCCL or CUDA is unavailable.
std::shared_ptr<Transport> make_nccl_transport(const std::string& unique_id, int rank, int size,
                                               int device, Millis timeout);

// "" when the NCCL backend can be used here, else why not.
std::string nccl_unavailable_reason();

// "" when libnccl.so.2 loads and has what is needed, else why not.
std::string nccl_library_error();

int nccl_version();  // 0 when unavailable

}  // namespace kevlarflow::comm
