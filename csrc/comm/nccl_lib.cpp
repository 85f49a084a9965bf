#include "nccl_lib.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>

namespace kevlarflow::comm::nccl {

Config nonblocking_config() {
  Config c;
  c.size = sizeof(Config);
  c.magic = kConfigMagic;
  c.version = kConfigVersion;
  c.blocking = 0;
  c.cgaClusterSize = kConfigUndefInt;
  c.minCTAs = kConfigUndefInt;
  c.maxCTAs = kConfigUndefInt;
  c.netName = nullptr;
  c.splitShare = kConfigUndefInt;
  return c;
}

std::string Lib::error(Result r, Comm comm) const {
  std::string text = std::string("NCCL error ") + std::to_string(r) + " (" +
                     (GetErrorString ? GetErrorString(r) : "?") + ")";
  if (comm && GetLastError) {
    const char* last = GetLastError(comm);
    if (last && *last) text += ": " + std::string(last);
  }
  return text;
}

namespace {

template <typename Fn>
void bind(void* handle, const char* name, Fn& fn, bool required = true) {
  fn = reinterpret_cast<Fn>(dlsym(handle, name));
  if (!fn && required)
    throw std::runtime_error(std::string("libnccl.so.2 has no ") + name +
                             " (NCCL 2.19 or newer is needed)");
}

Lib load() {
  // Already loaded by a CUDA torch in most processes; RTLD_NOLOAD is not
  // used, so a standalone libnccl.so.2 on the library path works too.
  void* handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    throw std::runtime_error(std::string("the NCCL backend needs libnccl.so.2, which could not be "
                                         "loaded: ") + (why ? why : "unknown error"));
  }
  Lib l;
  bind(handle, "ncclGetVersion", l.GetVersion);
  bind(handle, "ncclGetErrorString", l.GetErrorString);
  bind(handle, "ncclGetLastError", l.GetLastError, false);
  bind(handle, "ncclGetUniqueId", l.GetUniqueId);
  bind(handle, "ncclCommInitRankConfig", l.CommInitRankConfig);
  bind(handle, "ncclCommGetAsyncError", l.CommGetAsyncError);
  bind(handle, "ncclCommAbort", l.CommAbort);
  bind(handle, "ncclCommShrink", l.CommShrink, false);
  bind(handle, "ncclAllReduce", l.AllReduce);
  bind(handle, "ncclBroadcast", l.Broadcast);
  bind(handle, "ncclSend", l.Send);
  bind(handle, "ncclRecv", l.Recv);
  if (l.GetVersion(&l.version) != kSuccess) throw std::runtime_error("ncclGetVersion failed");
  if (l.version < static_cast<int>(kConfigVersion))
    throw std::runtime_error("NCCL " + std::to_string(l.version) +
                             " is too old: the NCCL backend needs 2.19 (21900) or newer");
  if (l.version < kShrinkVersion) l.CommShrink = nullptr;
  return l;
}

}  // namespace

const Lib& lib() {
  static std::once_flag once;
  static Lib* loaded = nullptr;
  static std::string failure;
  std::call_once(once, [] {
    try {
      loaded = new Lib(load());
    } catch (const std::exception& e) {
      failure = e.what();
    }
  });
  if (!loaded) throw std::runtime_error(failure);
  return *loaded;
}

}  // namespace kevlarflow::comm::nccl
