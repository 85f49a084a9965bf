// The Python module kevlarflow._comm: the communicator manager and its
// exceptions. kevlarflow/comm/manager.py is the public face; it constructs gloo
// process groups (torch's Python API) and hands them over here.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>

#include "block_packer.h"
#include "comm_channel.h"
#include "comm_error.h"
#include "comm_manager.h"
#include "gloo_transport.h"
#include "kv_replicator.h"
#include "nccl_transport.h"
#include "reaper.h"

namespace py = pybind11;
using namespace kevlarflow::comm;
using kevlarflow::replication::KVReplicator;
namespace replication = kevlarflow::replication;

#ifndef KEVLARFLOW_WITH_CUDA
// A CUDA build has the CUDA packer (csrc/replication/cuda_packer.cpp).
std::unique_ptr<replication::BlockPacker> replication::make_cuda_packer(
    std::vector<void*>, int, int64_t, int64_t, int64_t, std::shared_ptr<const void>) {
  throw std::invalid_argument(
      "KVReplicator: the caches are CUDA tensors, and this kevlarflow was built without CUDA "
      "(against a CPU torch): rebuild it against a CUDA torch, or replicate CPU caches");
}
#endif

namespace {

// The packer of a worker's KV caches: every K and V cache, each
// [num_blocks, ...], contiguous, one shape and dtype, all on the CPU or all
// on one CUDA device (the packer is chosen by it). The packer keeps the
// tensors, so their memory outlives it.
std::unique_ptr<replication::BlockPacker> packer_for(std::vector<at::Tensor> caches) {
  if (caches.empty()) throw std::invalid_argument("KVReplicator: no caches");
  const at::Tensor& first = caches.front();
  std::vector<void*> ptrs;
  for (const at::Tensor& c : caches) {
    if (!c.defined() || !(c.device().is_cpu() || c.device().is_cuda()) || !c.is_contiguous() ||
        c.dim() < 2)
      throw std::invalid_argument(
          "KVReplicator: caches must be contiguous CPU tensors (or CUDA tensors) of "
          "[num_blocks, block_size, ...]");
    if (c.device() != first.device())
      throw std::invalid_argument("KVReplicator: every cache must be on the device of the first (" +
                                  first.device().str() + "), got one on " + c.device().str());
    if (c.sizes() != first.sizes() || c.scalar_type() != first.scalar_type())
      throw std::invalid_argument(
          "KVReplicator: every cache must have the shape and dtype of the first");
    ptrs.push_back(c.data_ptr());
  }
  const int64_t num_blocks = first.size(0), block_rows = first.size(1);
  if (num_blocks < 1) throw std::invalid_argument("KVReplicator: caches hold no block");
  if (block_rows < 1 || first.numel() == 0)
    throw std::invalid_argument("KVReplicator: empty blocks");
  const int64_t cache_row_bytes =
      first.numel() / (num_blocks * block_rows) * static_cast<int64_t>(first.element_size());
  const at::Device device = first.device();
  auto owner = std::make_shared<std::vector<at::Tensor>>(std::move(caches));
  if (device.is_cuda())
    return replication::make_cuda_packer(std::move(ptrs), device.index(), num_blocks, block_rows,
                                         cache_row_bytes, std::move(owner));
  return replication::make_cpu_packer(std::move(ptrs), num_blocks, block_rows, cache_row_bytes,
                                      std::move(owner));
}

// Deadlines cross the boundary in seconds (Python) and become milliseconds,
// rounded up so that a tiny positive deadline never becomes zero.
std::optional<Millis> to_millis(std::optional<double> seconds, const char* what) {
  if (!seconds) return std::nullopt;
  if (!std::isfinite(*seconds) || *seconds <= 0)
    throw std::invalid_argument(std::string(what) + " must be a positive number of seconds, got " +
                                std::to_string(*seconds));
  return Millis(static_cast<int64_t>(std::ceil(*seconds * 1000.0)));
}

struct ExceptionTypes {
  py::object base, timeout, peer, aborted;
  const py::object& of(ErrorKind k) const {
    switch (k) {
      case ErrorKind::kTimeout: return timeout;
      case ErrorKind::kPeerFailure: return peer;
      case ErrorKind::kAborted: return aborted;
      case ErrorKind::kError: break;
    }
    return base;
  }
};

// Leaked on purpose: the translator may run during interpreter shutdown.
ExceptionTypes* g_types = nullptr;

py::object new_exception(py::module_& m, const char* name, PyObject* base, const char* doc) {
  std::string qualified = std::string("kevlarflow._comm.") + name;
  py::object type = py::reinterpret_steal<py::object>(
      PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base, nullptr));
  if (!type) throw py::error_already_set();
  m.attr(name) = type;
  return type;
}

}  // namespace

PYBIND11_MODULE(_comm, m) {
  m.doc() = "KevlarFlow communicator manager (see kevlarflow.comm.manager)";

  g_types = new ExceptionTypes();
  auto* types = g_types;
  types->base = new_exception(m, "CommError", PyExc_RuntimeError,
                              "A communicator op failed; .group, .generation, .op, .peer say where.");
  types->timeout = new_exception(m, "CommTimeout", types->base.ptr(),
                                 "The deadline passed (a peer hangs or is too slow).");
  types->peer = new_exception(m, "PeerFailure", types->base.ptr(),
                              "A peer closed its connection or died.");
  types->aborted = new_exception(m, "CommAborted", types->base.ptr(),
                                 "The communicator is aborted or broken by an earlier failure.");
  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    try {
      std::rethrow_exception(p);
    } catch (const CommFailure& e) {
      const py::object& type = g_types->of(e.kind);
      py::object exc = type(e.what());
      exc.attr("group") = e.group;
      exc.attr("generation") = e.generation;
      exc.attr("op") = e.op;
      exc.attr("peer") = e.peer;
      PyErr_SetObject(type.ptr(), exc.ptr());
    }
  });

  py::class_<PendingOp, std::shared_ptr<PendingOp>>(m, "PendingOp")
      .def(
          "wait",
          [](PendingOp& self, std::optional<double> deadline_s) {
            auto d = to_millis(deadline_s, "deadline_s");
            py::gil_scoped_release release;
            self.wait(d);
          },
          py::arg("deadline_s") = py::none())
      .def_property_readonly("done", &PendingOp::done);

  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<CommManager, std::shared_ptr<CommManager>>(m, "Manager")
      .def(py::init([](const std::string& me, double deadline_s) {
             return std::make_shared<CommManager>(me, *to_millis(deadline_s, "deadline_s"));
           }),
           py::arg("me"), py::arg("deadline_s"))
      .def_property_readonly("me", &CommManager::me)
      .def("begin_generation", &CommManager::begin_generation, Release())
      .def("shrink_plan", &CommManager::shrink_plan)
      .def("rebuild_generation", &CommManager::rebuild_generation)
      .def("install_gloo",
           [](CommManager& self, const std::string& group, int64_t generation, py::object pg) {
             auto backend = pg.cast<c10::intrusive_ptr<c10d::Backend>>();
             if (backend->getBackendName() != "gloo")
               throw std::invalid_argument("install_gloo: expected a gloo process group, got " +
                                           backend->getBackendName());
             self.install(group, generation, make_gloo_transport(std::move(backend)));
           })
      .def(
          "install_nccl",
          [](CommManager& self, const std::string& group, int64_t generation, py::bytes unique_id,
             int rank, int size, int device, double timeout_s) {
            std::string id = unique_id;
            auto timeout = *to_millis(timeout_s, "deadline_s");
            std::shared_ptr<Transport> t;
            {
              py::gil_scoped_release release;
              try {
                t = make_nccl_transport(id, rank, size, device, timeout);
              } catch (const TransportError& e) {
                std::string peers = "all of " + std::to_string(size) + " ranks";
                CommFailure failure(e.kind, group, generation, "build", peers, e.what());
                self.fail(group, generation, failure.what());
                throw failure;
              }
            }
            self.install(group, generation, std::move(t));
          })
      .def(
          "shrink_by_backend",
          [](CommManager& self, const std::string& group, const std::vector<std::string>& excluded,
             double timeout_s) {
            auto timeout = *to_millis(timeout_s, "deadline_s");
            py::gil_scoped_release release;
            return self.shrink_by_backend(group, excluded, timeout);
          })
      .def("fail", &CommManager::fail)
      .def("abort", &CommManager::abort, Release())
      .def("abort_generation", &CommManager::abort_generation, Release())
      .def("close", &CommManager::close, Release())
      .def(
          "send",
          [](CommManager& self, const std::string& group, const at::Tensor& t,
             const std::string& dst, std::optional<double> deadline_s,
             std::optional<int64_t> generation) {
            auto d = to_millis(deadline_s, "deadline_s");
            py::gil_scoped_release release;
            self.send(group, t, dst, d, generation);
          },
          py::arg("group"), py::arg("tensor"), py::arg("dst"), py::arg("deadline_s") = py::none(),
          py::arg("generation") = py::none())
      .def("isend", &CommManager::isend, py::arg("group"), py::arg("tensor"), py::arg("dst"),
           py::arg("generation") = py::none(), Release())
      .def(
          "recv",
          [](CommManager& self, const std::string& group, const at::Tensor& t,
             const std::string& src, std::optional<double> deadline_s,
             std::optional<int64_t> generation) {
            auto d = to_millis(deadline_s, "deadline_s");
            py::gil_scoped_release release;
            self.recv(group, t, src, d, generation);
          },
          py::arg("group"), py::arg("tensor"), py::arg("src"), py::arg("deadline_s") = py::none(),
          py::arg("generation") = py::none())
      .def(
          "allreduce",
          [](CommManager& self, const std::string& group, const at::Tensor& t,
             std::optional<double> deadline_s) {
            auto d = to_millis(deadline_s, "deadline_s");
            py::gil_scoped_release release;
            self.allreduce(group, t, d);
          },
          py::arg("group"), py::arg("tensor"), py::arg("deadline_s") = py::none())
      .def(
          "broadcast",
          [](CommManager& self, const std::string& group, const at::Tensor& t,
             const std::string& root, std::optional<double> deadline_s) {
            auto d = to_millis(deadline_s, "deadline_s");
            py::gil_scoped_release release;
            self.broadcast(group, t, root, d);
          },
          py::arg("group"), py::arg("tensor"), py::arg("root"), py::arg("deadline_s") = py::none())
      .def("has", &CommManager::has)
      .def("generation", &CommManager::generation)
      .def("members", &CommManager::members)
      .def("rank", &CommManager::rank)
      .def("broken", &CommManager::broken)
      .def("groups", &CommManager::groups)
      .def("inflight", &CommManager::inflight);

  py::class_<KVReplicator, std::shared_ptr<KVReplicator>>(m, "KVReplicator")
      .def(py::init([](const std::shared_ptr<CommManager>& manager, std::vector<at::Tensor> caches,
                       int64_t max_transfer_bytes, double keepalive_s, double interval_s) {
             if (!(interval_s >= 0))
               throw std::invalid_argument("interval_s must be >= 0, got " +
                                           std::to_string(interval_s));
             auto interval = Millis(static_cast<int64_t>(std::ceil(interval_s * 1000.0)));
             auto keepalive = *to_millis(keepalive_s, "keepalive_s");
             auto channels = replication::comm_channels(manager);
             return std::make_shared<KVReplicator>(packer_for(std::move(caches)),
                                                   std::move(channels), max_transfer_bytes,
                                                   keepalive, interval);
           }),
           py::arg("manager"), py::arg("caches"), py::arg("max_transfer_bytes"),
           py::arg("keepalive_s"), py::arg("interval_s") = 0.0)
      .def("start", &KVReplicator::start, py::arg("group"), py::arg("backup"), Release())
      .def("stop", &KVReplicator::stop, Release())
      .def("flush", &KVReplicator::flush, Release())
      .def("submit", &KVReplicator::submit, py::arg("src"), py::arg("dst"), py::arg("step"),
           py::arg("begin") = std::vector<int64_t>{}, py::arg("end") = std::vector<int64_t>{},
           Release())
      .def(
          "receive",
          [](KVReplicator& self, const std::string& group, const std::string& source,
             std::optional<double> deadline_s) {
            auto d = to_millis(deadline_s, "deadline_s");
            py::gil_scoped_release release;
            return self.receive(group, source, d);
          },
          py::arg("group"), py::arg("source"), py::arg("deadline_s") = py::none())
      .def("stats",
           [](const KVReplicator& self) {
             auto s = self.stats();
             py::dict d;
             d["transfers"] = s.transfers;
             d["blocks_sent"] = s.blocks_sent;
             d["bytes_sent"] = s.bytes_sent;
             d["blocks_submitted"] = s.blocks_submitted;
             d["blocks_coalesced"] = s.blocks_coalesced;
             d["pending_blocks"] = s.pending_blocks;
             d["blocks_received"] = s.blocks_received;
             d["bytes_received"] = s.bytes_received;
             d["pack_seconds"] = s.pack_seconds;
             d["send_seconds"] = s.send_seconds;
             d["unpack_seconds"] = s.unpack_seconds;
             d["error"] = s.error;
             return d;
           })
      .def_property_readonly("num_blocks", &KVReplicator::num_blocks)
      .def_property_readonly("block_bytes", &KVReplicator::block_bytes)
      .def_property_readonly("row_bytes", &KVReplicator::row_bytes);

  m.def("nccl_unique_id", [] { return py::bytes(nccl_unique_id()); },
        "A fresh ncclUniqueId (128 bytes).");
  m.def("nccl_unavailable_reason", &nccl_unavailable_reason,
        "'' when the NCCL backend can be used in this process, else why not.");
  m.def("nccl_library_error", &nccl_library_error,
        "'' when libnccl.so.2 loads (CUDA or not), else why it does not.");
  m.def("nccl_version", &nccl_version, "NCCL's version code (0 when unavailable).");
  m.def("retired_pending", &retired_pending,
        "Retired communicators whose teardown has not finished yet.");
}
