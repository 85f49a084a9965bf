// The gloo transport drives a ProcessGroupGloo through c10d::Backend only:
// the torch wheel ships Backend.hpp but no gloo headers, so the group is
// constructed in Python and handed over as a Backend.
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <memory>

#include "transport.h"

namespace kevlarflow::comm {

std::shared_ptr<Transport> make_gloo_transport(c10::intrusive_ptr<c10d::Backend> backend);

}  // namespace kevlarflow::comm
