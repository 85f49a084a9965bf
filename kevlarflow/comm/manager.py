"""Communicators that can be aborted, shrunk and rebuilt, with a deadline on every op.

A communicator is keyed by a group name and has a generation number and an
explicit member list (member ids such as "w0.1"; rank = index in the list).
Each generation is connected through its own store prefix
("kevlarflow/comm/{group}/gen{generation}"), so it gets its own connections:
a message sent on one generation can never be received on another.

A build can run in the background (start_build) and be called off at any
moment (Build.cancel, or abandon_generation from anyone who can reach the
store): its members meet at an abortable rendezvous first (rendezvous.py), so
a build never waits out its deadline for a member that is dead or has moved
on.

The op execution, deadlines, error classification, the broken state and the
registry live in the native module (csrc/comm/); this class only builds what
needs torch's Python API (the gloo process group over a PrefixStore).
"""
from __future__ import annotations

import datetime
import logging
import threading
from typing import Callable

import torch
import torch.distributed as dist

from kevlarflow import _comm
from kevlarflow.comm import rendezvous
from kevlarflow.comm.build import Build

CommError = _comm.CommError          # base; .group .generation .op .peer
CommTimeout = _comm.CommTimeout      # the deadline passed (a hung peer)
PeerFailure = _comm.PeerFailure      # a peer closed its connection / died
CommAborted = _comm.CommAborted      # op on an aborted or broken communicator
PendingOp = _comm.PendingOp          # from isend(); .wait(deadline_s=None)

BACKENDS = ("gloo", "nccl")

log = logging.getLogger("kevlarflow.comm")

__all__ = ["CommManager", "Build", "CommError", "CommTimeout", "PeerFailure", "CommAborted",
           "PendingOp", "BACKENDS", "store_prefix", "abandon_generation"]


def store_prefix(group: str, generation: int) -> str:
    """The store namespace of one generation of a group."""
    return f"kevlarflow/comm/{group}/gen{generation}"


def abandon_generation(store: dist.Store, group: str, generation: int, size: int,
                       reason: str) -> None:
    """Call off a generation of `size` members: every member building it gives
    up at once (CommAborted), wherever it runs. `store` is the deployment's
    store itself (not a PrefixStore), on a client no build waits on."""
    rendezvous.abandon(dist.PrefixStore(store_prefix(group, generation), store), size, reason)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown communicator backend {backend!r}; choose one of {BACKENDS}")
    if backend == "nccl":
        from kevlarflow.comm import nccl
        reason = nccl.unavailable_reason()
        if reason:
            raise RuntimeError(f"CommManager(backend='nccl'): {reason}")
    return backend


def _build_error(group: str, generation: int, members: list[str], cause: Exception) -> CommError:
    """A failed connect as the native errors look: a store wait that ran out is
    a timeout (a member never came), a generation called off is aborted,
    anything else a peer failure."""
    text = str(cause)
    lower = text.lower()
    if isinstance(cause, rendezvous.Abandoned):
        kind, text = CommAborted, f"abandoned: {text}"
    elif "timeout" in lower or "timed out" in lower:
        kind = CommTimeout
    else:
        kind = PeerFailure
    error = kind(f"build on group {group!r} generation {generation} among {members}: {text}")
    error.group, error.generation, error.op = group, generation, "build"
    error.peer = "all of " + str(members)
    return error


class CommManager:
    """The communicators of one process (member id `me`).

    connect_store, if given, makes a new client of the deployment's store; each
    build then waits on a client of its own (a client serialises its calls, so
    builds that share one would wait for each other, and so would a cancel).
    Without it, builds use `store`, one at a time.

    `backend` is each group's default; a build may name another (a worker's
    pipeline over NCCL, its replication link over Gloo). `device`: the GPU
    of NCCL groups (default: the current device of the thread that starts a
    build, which then connects on a thread of its own)."""

    def __init__(self, store: dist.Store, me: str, deadline_s: float = 5.0,
                 backend: str = "gloo", connect_store: Callable[[], dist.Store] | None = None,
                 device: int | None = None):
        _check_backend(backend)
        if not isinstance(store, dist.Store):
            raise TypeError(f"store must be a torch.distributed.Store, got {type(store).__name__}")
        self._backends: dict[str, str] = {}  # each group's, as last built
        self._device = device
        self._store = store
        self._connect_store = connect_store
        self._signal_lock = threading.Lock()
        self._signal_store: dist.Store | None = None  # the client that calls builds off
        self._backend = backend
        self._deadline_s = float(deadline_s)
        self._core = _comm.Manager(str(me), self._deadline_s)

    @property
    def me(self) -> str:
        return self._core.me

    @property
    def backend(self) -> str:
        """The default backend of a group."""
        return self._backend

    def backend_of(self, group: str) -> str:
        """The backend `group` was last built with."""
        return self._backends.get(group, self._backend)

    # ---- group lifecycle --------------------------------------------------

    def build(self, group: str, members: list[str], generation: int = 0,
              deadline_s: float | None = None, backend: str | None = None) -> None:
        """Connect `group` among `members` (collective: every member calls it)."""
        self.start_build(group, members, generation, deadline_s, backend=backend).wait()

    def start_build(self, group: str, members: list[str], generation: int,
                    deadline_s: float | None = None,
                    on_done: Callable[[Build], None] | None = None,
                    backend: str | None = None) -> Build:
        """Begin `generation` of `group` now (ops on the group fail as aborted
        until it is connected; its previous generation is retired) and
        connect it on a background thread."""
        members = [str(m) for m in members]
        deadline_s = self._deadline(deadline_s)
        backend = _check_backend(backend or self._backend)
        rank = self._core.begin_generation(group, members, int(generation))
        self._backends[group] = backend
        generation, device = int(generation), self._device_for(backend)
        build = Build(group, members, generation, backend,
                      connect=lambda: self._connect(group, members, generation, rank, deadline_s,
                                                    backend, device),
                      call_off=lambda reason: self._call_off(group, generation, len(members),
                                                             reason),
                      on_done=on_done)
        build.start()
        return build

    def abort(self, group: str, generation: int | None = None) -> None:
        """Abort `group`'s communicator (only if `generation` is still its
        current one, when given); never blocks, idempotent."""
        if generation is None:
            self._core.abort(group)
        else:
            self._core.abort_generation(group, int(generation))

    def shrink(self, group: str, excluded: list[str], deadline_s: float | None = None) -> int:
        """Drop `excluded` (survivors call it with the same set); returns the new generation.

        Ranks are renumbered: a survivor's new rank is its index among the survivors.
        NCCL 2.27+ shrinks a healthy communicator in place (ncclCommShrink); a
        broken one, and every other case, is connected anew."""
        excluded = [str(m) for m in excluded]
        if self.backend_of(group) == "nccl":
            generation = self._core.shrink_by_backend(
                group, excluded, self._deadline_s if deadline_s is None else float(deadline_s))
            if generation >= 0:
                return generation
        members, generation = self._core.shrink_plan(group, excluded)
        rank = self._core.begin_generation(group, members, generation)
        backend = self.backend_of(group)
        self._connect(group, members, generation, rank, deadline_s, backend,
                      self._device_for(backend))
        return generation

    def rebuild(self, group: str, members: list[str], deadline_s: float | None = None) -> int:
        """Connect `group` anew among any `members`; returns the new generation
        (the last one this process used for `group` plus one, or 0)."""
        members = [str(m) for m in members]
        generation = self._core.rebuild_generation(group)
        rank = self._core.begin_generation(group, members, generation)
        backend = self.backend_of(group)
        self._connect(group, members, generation, rank, deadline_s, backend,
                      self._device_for(backend))
        return generation

    def close(self) -> None:
        """Abort every communicator; never blocks. The manager is unusable after."""
        self._core.close()

    def _deadline(self, deadline_s: float | None) -> float:
        deadline_s = self._deadline_s if deadline_s is None else float(deadline_s)
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        return deadline_s

    def _call_off(self, group: str, generation: int, size: int, reason: str) -> None:
        self._core.fail(group, generation, f"called off: {reason}")
        if self._connect_store is None:
            return  # the only client may be waiting in that very build
        try:
            with self._signal_lock:
                if self._signal_store is None:
                    self._signal_store = self._connect_store()
                abandon_generation(self._signal_store, group, generation, size, reason)
        except Exception as error:  # noqa: BLE001  (the store is gone: so is every build)
            log.info("could not call off %s generation %d in the store: %s", group, generation,
                     error)

    def _device_for(self, backend: str) -> int | None:
        """An NCCL group's GPU, read on the calling thread (a build connects
        on another, whose current device is its own)."""
        if backend != "nccl":
            return None
        return self._device if self._device is not None else torch.cuda.current_device()

    def _connect(self, group, members, generation, rank, deadline_s, backend, device) -> None:
        deadline_s = self._deadline(deadline_s)
        try:
            client = self._connect_store() if self._connect_store is not None else self._store
            store = dist.PrefixStore(store_prefix(group, generation), client)
            rendezvous.meet(store, rank, len(members), deadline_s)
            if backend == "gloo":
                self._core.install_gloo(group, generation, self._new_gloo(store, rank, len(members),
                                                                         deadline_s))
            else:
                from kevlarflow.comm import nccl
                nccl.connect(self._core, store, group, generation, rank, len(members), deadline_s,
                             device)
        except CommError:
            raise
        except Exception as e:
            self._core.fail(group, generation, str(e))
            raise _build_error(group, generation, members, e) from e

    @staticmethod
    def _new_gloo(store, rank: int, size: int, deadline_s: float):
        # The gloo timeout is the deadline, so gloo's own threads give up too.
        # No reference is kept here: the native side owns the group, so its
        # teardown happens on the reaper thread, not in a Python decref.
        return dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=deadline_s))

    # ---- ops --------------------------------------------------------------

    # With `generation`, a point-to-point op is for that generation only: on
    # a group rebuilt meanwhile it raises CommAborted, never reaching the
    # new generation's peer.
    def send(self, group: str, tensor: torch.Tensor, dst: str, deadline_s=None,
             generation: int | None = None) -> None:
        self._core.send(group, tensor, dst, deadline_s, generation)

    def isend(self, group: str, tensor: torch.Tensor, dst: str,
              generation: int | None = None) -> PendingOp:
        return self._core.isend(group, tensor, dst, generation)

    def recv(self, group: str, tensor: torch.Tensor, src: str, deadline_s=None,
             generation: int | None = None) -> None:
        self._core.recv(group, tensor, src, deadline_s, generation)

    def allreduce(self, group: str, tensor: torch.Tensor, deadline_s=None) -> None:
        self._core.allreduce(group, tensor, deadline_s)

    def broadcast(self, group: str, tensor: torch.Tensor, root: str, deadline_s=None) -> None:
        self._core.broadcast(group, tensor, root, deadline_s)

    # ---- queries ----------------------------------------------------------

    def generation(self, group: str) -> int:
        return self._core.generation(group)

    def members(self, group: str) -> list[str]:
        return self._core.members(group)

    def rank(self, group: str) -> int:
        return self._core.rank(group)

    def has(self, group: str) -> bool:
        return self._core.has(group)

    def healthy(self, group: str) -> bool:
        """True while `group` can run ops (connected, not aborted, not broken)."""
        return self._core.has(group) and not self._core.broken(group)
