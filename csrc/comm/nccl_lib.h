// NCCL, loaded at run time with dlopen("libnccl.so.2"): no build-time NCCL
// dependency and no nccl.h. The few types used are declared here with NCCL's
// values; ncclConfig_t is declared up to splitShare and announced to NCCL with
// that size and the version it matches, so a newer NCCL reads only these
// fields and leaves the rest at their defaults.
#pragma once
#include <climits>
#include <cstddef>
#include <string>

namespace kevlarflow::comm::nccl {

using Comm = void*;  // ncclComm_t
struct UniqueId {
  char internal[128];
};

enum Result : int {
  kSuccess = 0,
  kUnhandledCudaError = 1,
  kSystemError = 2,
  kInternalError = 3,
  kInvalidArgument = 4,
  kInvalidUsage = 5,
  kRemoteError = 6,
  kInProgress = 7,
};

enum DataType : int {
  kInt8 = 0, kUint8 = 1, kInt32 = 2, kUint32 = 3, kInt64 = 4, kUint64 = 5,
  kFloat16 = 6, kFloat32 = 7, kFloat64 = 8, kBfloat16 = 9,
};

enum RedOp : int { kSum = 0 };

constexpr int kConfigUndefInt = INT_MIN;  // NCCL_CONFIG_UNDEF_INT
constexpr unsigned kConfigMagic = 0xcafebeef;
constexpr unsigned kConfigVersion = 21900;  // the layout below is NCCL 2.19's
constexpr int kShrinkAbort = 1;             // NCCL_SHRINK_ABORT
constexpr int kShrinkVersion = 22700;       // ncclCommShrink appeared in 2.27

struct Config {
  size_t size;
  unsigned magic;
  unsigned version;
  int blocking;
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char* netName;
  int splitShare;
};

// A non-blocking communicator's config: every call returns at once and
// progress is polled, so no call can hang on a dead peer.
Config nonblocking_config();

struct Lib {
  int version = 0;
  Result (*GetVersion)(int*);
  const char* (*GetErrorString)(Result);
  const char* (*GetLastError)(Comm);  // may be null (older NCCL)
  Result (*GetUniqueId)(UniqueId*);
  Result (*CommInitRankConfig)(Comm*, int, UniqueId, int, Config*);
  Result (*CommGetAsyncError)(Comm, Result*);
  Result (*CommAbort)(Comm);
  Result (*CommShrink)(Comm, int*, int, Comm*, Config*, int);  // null before 2.27
  Result (*AllReduce)(const void*, void*, size_t, DataType, RedOp, Comm, void*);
  Result (*Broadcast)(const void*, void*, size_t, DataType, int, Comm, void*);
  Result (*Send)(const void*, size_t, DataType, int, Comm, void*);
  Result (*Recv)(void*, size_t, DataType, int, Comm, void*);

  std::string error(Result r, Comm comm = nullptr) const;
};

// The process's NCCL; throws std::runtime_error saying why when libnccl.so.2
// cannot be loaded or lacks a needed function.
const Lib& lib();

}  // namespace kevlarflow::comm::nccl
