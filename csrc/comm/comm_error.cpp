#include "comm_error.h"

#include <algorithm>
#include <cctype>

namespace kevlarflow::comm {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kTimeout: return "timed out";
    case ErrorKind::kPeerFailure: return "peer failure";
    case ErrorKind::kAborted: return "aborted";
    case ErrorKind::kError: break;
  }
  return "error";
}

CommFailure::CommFailure(ErrorKind kind, std::string group, int64_t generation, std::string op,
                         std::string peer, const std::string& detail)
    : std::runtime_error(op + " on group '" + group + "' generation " +
                         std::to_string(generation) + " (peer " + peer + "): " +
                         error_kind_name(kind) + ": " + detail),
      kind(kind),
      group(std::move(group)),
      generation(generation),
      op(std::move(op)),
      peer(std::move(peer)) {}

ErrorKind classify_backend_error(const std::string& text) {
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  auto has = [&](const char* word) { return lower.find(word) != std::string::npos; };
  // Gloo: "Timed out waiting ...", "Operation timed out!", and after its own
  // timeout "Application timeout caused pair closure"; the store: "wait timeout".
  if (has("timed out") || has("timeout")) return ErrorKind::kTimeout;
  // Gloo: "Connection closed by peer", "Read error ...: Connection reset by
  // peer", "Write error ...: Broken pipe"; NCCL: "remote process exited".
  if (has("closed by peer") || has("reset by peer") || has("broken pipe") ||
      has("read error") || has("write error") || has("connection refused") ||
      has("remote process") || has("remote error"))
    return ErrorKind::kPeerFailure;
  return ErrorKind::kError;
}

}  // namespace kevlarflow::comm
