"""Communicators that can be aborted, shrunk and rebuilt, with a deadline on every op.

A communicator is keyed by a group name and has a generation number and an
explicit member list (member ids such as "w0.1"; rank = index in the list).
Each generation is connected through its own store prefix
("kevlarflow/comm/{group}/gen{generation}"), so it gets its own connections:
a message sent on one generation can never be received on another.

The op execution, deadlines, error classification, the broken state and the
registry live in the native module (csrc/comm/); this class only builds what
needs torch's Python API (the gloo process group over a PrefixStore).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from kevlarflow import _comm

CommError = _comm.CommError          # base; .group .generation .op .peer
CommTimeout = _comm.CommTimeout      # the deadline passed (a hung peer)
PeerFailure = _comm.PeerFailure      # a peer closed its connection / died
CommAborted = _comm.CommAborted      # op on an aborted or broken communicator
PendingOp = _comm.PendingOp          # from isend(); .wait(deadline_s=None)

BACKENDS = ("gloo", "nccl")

__all__ = ["CommManager", "CommError", "CommTimeout", "PeerFailure", "CommAborted",
           "PendingOp", "BACKENDS", "store_prefix"]


def store_prefix(group: str, generation: int) -> str:
    """The store namespace of one generation of a group."""
    return f"kevlarflow/comm/{group}/gen{generation}"


def _build_error(group: str, generation: int, members: list[str], cause: Exception) -> CommError:
    """A failed connect as the native errors look: a store wait that ran out is
    a timeout (a member never came), anything else a peer failure."""
    text = str(cause)
    lower = text.lower()
    kind = CommTimeout if ("timeout" in lower or "timed out" in lower) else PeerFailure
    error = kind(f"build on group {group!r} generation {generation} among {members}: {text}")
    error.group, error.generation, error.op = group, generation, "build"
    error.peer = "all of " + str(members)
    return error


class CommManager:
    """The communicators of one process (member id `me`)."""

    def __init__(self, store: dist.Store, me: str, deadline_s: float = 5.0,
                 backend: str = "gloo"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown communicator backend {backend!r}; choose one of {BACKENDS}")
        if not isinstance(store, dist.Store):
            raise TypeError(f"store must be a torch.distributed.Store, got {type(store).__name__}")
        if backend == "nccl":
            from kevlarflow.dist import nccl
            reason = nccl.unavailable_reason()
            if reason:
                raise RuntimeError(f"CommManager(backend='nccl'): {reason}")
        self._store = store
        self._backend = backend
        self._deadline_s = float(deadline_s)
        self._core = _comm.Manager(str(me), self._deadline_s)

    @property
    def me(self) -> str:
        return self._core.me

    @property
    def backend(self) -> str:
        return self._backend

    # ---- group lifecycle --------------------------------------------------

    def build(self, group: str, members: list[str], generation: int = 0,
              deadline_s: float | None = None) -> None:
        """Connect `group` among `members` (collective: every member calls it)."""
        members = [str(m) for m in members]
        rank = self._core.begin_generation(group, members, int(generation))
        self._connect(group, members, int(generation), rank, deadline_s)

    def abort(self, group: str) -> None:
        """Abort `group`'s communicator; never blocks, idempotent."""
        self._core.abort(group)

    def shrink(self, group: str, excluded: list[str], deadline_s: float | None = None) -> int:
        """Drop `excluded` (survivors call it with the same set); returns the new generation.

        Ranks are renumbered: a survivor's new rank is its index among the survivors.
        NCCL 2.27+ shrinks a healthy communicator in place (ncclCommShrink); a
        broken one, and every other case, is connected anew."""
        excluded = [str(m) for m in excluded]
        if self._backend == "nccl":
            generation = self._core.shrink_by_backend(
                group, excluded, self._deadline_s if deadline_s is None else float(deadline_s))
            if generation >= 0:
                return generation
        members, generation = self._core.shrink_plan(group, excluded)
        rank = self._core.begin_generation(group, members, generation)
        self._connect(group, members, generation, rank, deadline_s)
        return generation

    def rebuild(self, group: str, members: list[str], deadline_s: float | None = None) -> int:
        """Connect `group` anew among any `members`; returns the new generation
        (the last one this process used for `group` plus one, or 0)."""
        members = [str(m) for m in members]
        generation = self._core.rebuild_generation(group)
        rank = self._core.begin_generation(group, members, generation)
        self._connect(group, members, generation, rank, deadline_s)
        return generation

    def close(self) -> None:
        """Abort every communicator; never blocks. The manager is unusable after."""
        self._core.close()

    def _connect(self, group, members, generation, rank, deadline_s) -> None:
        deadline_s = self._deadline_s if deadline_s is None else float(deadline_s)
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        store = dist.PrefixStore(store_prefix(group, generation), self._store)
        try:
            if self._backend == "gloo":
                self._core.install_gloo(group, generation, self._new_gloo(store, rank, len(members),
                                                                         deadline_s))
            else:
                from kevlarflow.dist import nccl
                nccl.connect(self._core, store, group, generation, rank, len(members), deadline_s)
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

    def send(self, group: str, tensor: torch.Tensor, dst: str, deadline_s=None) -> None:
        self._core.send(group, tensor, dst, deadline_s)

    def isend(self, group: str, tensor: torch.Tensor, dst: str) -> PendingOp:
        return self._core.isend(group, tensor, dst)

    def recv(self, group: str, tensor: torch.Tensor, src: str, deadline_s=None) -> None:
        self._core.recv(group, tensor, src, deadline_s)

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

    def broken_reason(self, group: str) -> str:
        """Why `group` cannot run ops ("" while it can)."""
        return self._core.broken(group)
