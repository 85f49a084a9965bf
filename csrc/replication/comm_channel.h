// A replication link's channel over the communicator manager: the link is a
// two-member group, its messages raw bytes.
#pragma once
#include <memory>

#include "comm_manager.h"
#include "link_channel.h"

namespace kevlarflow::replication {

ChannelFactory comm_channels(std::shared_ptr<comm::CommManager> manager);

}  // namespace kevlarflow::replication
