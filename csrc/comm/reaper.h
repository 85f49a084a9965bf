// Destroys retired transports on a background thread. Destroying a gloo
// process group joins its worker threads, which may sit in an op on a hung
// peer until gloo's own timeout: abort, shrink and rebuild hand the old
// transport here instead of waiting for that on the caller's thread.
#pragma once
#include <memory>

#include "transport.h"

namespace kevlarflow::comm {

// Takes ownership; returns at once.
void retire(std::shared_ptr<Transport> transport);

// Transports handed over and not yet destroyed (for tests and the benchmark).
size_t retired_pending();

}  // namespace kevlarflow::comm
