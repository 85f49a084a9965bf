"""The controller's record of each worker slot: which process holds it, how
to reach it, and how far along it is.

A slot is named "w{instance}.{stage}" and outlives its processes: after a
failure a replacement process takes the same slot (and name)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum


class WorkerState(str, Enum):
    EMPTY = "empty"        # no process (waiting for one to register, or for a replacement)
    STARTING = "starting"  # a process was started here, it has not registered yet
    LOADING = "loading"    # registered, loading its stage's weights
    READY = "ready"        # loaded: it can be a member of communicators and run steps


@dataclass(eq=False)
class WorkerRecord:
    name: str
    instance: int
    stage: int
    state: WorkerState = WorkerState.EMPTY
    since: float = field(default_factory=time.monotonic)  # when it entered its state
    peer: bytes | None = None            # its control socket identity
    heartbeat_peer: bytes | None = None  # its heartbeat socket identity
    pid: int | None = None
    host: str | None = None
    device: str | None = None            # where it loaded, once ready
    nccl: bool = False                   # NCCL works in its process

    @property
    def ready(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def live(self) -> bool:
        """Registered and not failed since (loading or ready)."""
        return self.state in (WorkerState.LOADING, WorkerState.READY)

    def enter(self, state: WorkerState) -> None:
        self.state, self.since = state, time.monotonic()


class WorkerTable:
    """Every slot of the deployment, in instance then stage order."""

    def __init__(self, num_instances: int, pp_size: int):
        self.records = {f"w{i}.{s}": WorkerRecord(f"w{i}.{s}", i, s)
                        for i in range(num_instances) for s in range(pp_size)}
        self._by_peer: dict[bytes, WorkerRecord] = {}

    def __getitem__(self, name: str) -> WorkerRecord:
        return self.records[name]

    def __iter__(self):
        return iter(self.records.values())

    def names(self) -> list[str]:
        return list(self.records)

    def ready(self, name: str) -> bool:
        return self.records[name].ready

    def by_peer(self, peer: bytes) -> WorkerRecord | None:
        return self._by_peer.get(peer)

    def free_slot(self, wanted: tuple[int | None, int | None]) -> WorkerRecord | None:
        """A slot a registering process may take: one with no process, or
        the one started for it (wanted = (instance, stage) it asks for)."""
        for record in self.records.values():
            if record.state not in (WorkerState.EMPTY, WorkerState.STARTING):
                continue
            if wanted == (None, None) or wanted == (record.instance, record.stage):
                return record
        return None

    def register(self, record: WorkerRecord, peer: bytes, pid: int, host: str) -> None:
        record.peer, record.pid, record.host, record.heartbeat_peer = peer, pid, host, None
        self._by_peer[peer] = record
        record.enter(WorkerState.LOADING)

    def vacate(self, record: WorkerRecord, state: WorkerState = WorkerState.EMPTY) -> None:
        """Its process is gone: no message of it is trusted again."""
        if record.peer is not None:
            self._by_peer.pop(record.peer, None)
        record.peer = record.heartbeat_peer = record.pid = record.host = None
        record.enter(state)
