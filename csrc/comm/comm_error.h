// Errors of the communicator manager. A transport reports what went wrong
// (TransportError: a kind and the backend's text); the manager adds where it
// happened (CommFailure: group, generation, op, peer), which the bindings
// turn into kevlarflow.comm.manager.CommTimeout / PeerFailure / CommAborted.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kevlarflow::comm {

enum class ErrorKind {
  kError,        // anything else a backend reported
  kTimeout,      // the deadline passed: a peer hangs or is too slow
  kPeerFailure,  // a peer closed its connection or died
  kAborted,      // the communicator was aborted, or is broken by an earlier failure
};

const char* error_kind_name(ErrorKind kind);

struct TransportError : std::runtime_error {
  TransportError(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind(kind) {}
  ErrorKind kind;
};

struct CommFailure : std::runtime_error {
  CommFailure(ErrorKind kind, std::string group, int64_t generation, std::string op,
              std::string peer, const std::string& detail);
  ErrorKind kind;
  std::string group;
  int64_t generation;
  std::string op;
  std::string peer;
};

// Sorts a backend's error text into a kind. Backends word the same failure in
// many ways; anything not recognised stays kError rather than being guessed.
ErrorKind classify_backend_error(const std::string& text);

}  // namespace kevlarflow::comm
