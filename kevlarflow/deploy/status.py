"""A typed snapshot of a deployment, for readers on other threads (the HTTP
server's /health, /status and /metrics, benchmarks).

The controller is stepped on its own thread; snapshot() copies what it
needs, and a copy that races with that thread (a dict that changed size
while it was copied) is taken again."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from kevlarflow.ft.events import Event

RECENT_EVENTS = 20


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    instance: int
    stage: int
    state: str                # workers.WorkerState value
    pid: int | None
    host: str | None
    silent_s: float | None    # since its last heartbeat (None: not watched)
    replacements: int         # started since it was last ready
    blocks_used: int          # of its KV pool, by requests (replica blocks apart)

    @property
    def live(self) -> bool:
        return self.state == "ready"


@dataclass(frozen=True)
class InstanceStatus:
    index: int
    phase: str                # ft.phases.Phase value
    reason: str               # why it entered that phase
    serving: bool
    workers: list[str]        # what it runs on now
    home: list[str]           # its own workers
    requests: int
    running: int
    waiting: int
    steps: int                # micro-batches dispatched so far
    peak_in_flight: int       # most micro-batches in flight at once

    @property
    def borrowed(self) -> list[str]:
        return [w for w in self.workers if w not in self.home]


@dataclass(frozen=True)
class DeploymentStatus:
    recovery: str
    num_instances: int
    pp_size: int
    heartbeat_s: float
    workers: list[WorkerStatus]
    instances: list[InstanceStatus]
    replication_enabled: bool
    # tokens_restored, tokens_recomputed, requests_restored, bytes_replicated
    stats: dict[str, int]
    # bytes_sent, bytes_received, pack_s, send_s, unpack_s: Replication.totals()
    replication_totals: dict[str, float]
    lag_tokens: list[int]     # per running request and link
    replica_blocks_used: int  # over every replication link
    events: list[Event] = field(default_factory=list)

    @property
    def recent_events(self) -> list[Event]:
        return self.events[-RECENT_EVENTS:]


def snapshot(controller, attempts: int = 20) -> DeploymentStatus:
    for _ in range(attempts - 1):
        try:
            return _read(controller)
        except (RuntimeError, KeyError, IndexError):  # changed under us: read again
            time.sleep(0.001)
    return _read(controller)


def _read(c) -> DeploymentStatus:
    now = time.monotonic()
    seen = dict(c.health.last_seen)
    attempts = dict(c.recovery.replacements.attempts)
    pools = dict(c.pools)
    workers = [WorkerStatus(r.name, r.instance, r.stage, r.state.value, r.pid, r.host,
                            now - seen[r.name] if r.name in seen else None,
                            attempts.get(r.name, 0), _used(pools[r.name]))
               for r in list(c.workers)]
    instances = []
    for inst, st in zip(list(c.instances), list(c.recovery.states)):
        instances.append(InstanceStatus(
            inst.index, st.phase.value, st.reason, bool(inst.serving), list(inst.workers),
            list(inst.home), len(inst.sequences), len(inst.scheduler.running),
            len(inst.scheduler.waiting), inst.steps_dispatched, inst.peak_in_flight))
    stats = c.recovery.stats
    return DeploymentStatus(
        recovery=c.config.recovery, num_instances=c.config.num_instances,
        pp_size=c.config.pp_size, heartbeat_s=c.config.heartbeat_s, workers=workers,
        instances=instances, replication_enabled=c.replication.enabled,
        stats=dict(tokens_restored=stats.tokens_restored,
                   tokens_recomputed=stats.tokens_recomputed,
                   requests_restored=stats.requests_restored,
                   bytes_replicated=c.replication.bytes_replicated),
        replication_totals=c.replication.totals(),
        lag_tokens=c.replication.lag(list(c.instances)),
        replica_blocks_used=sum(_used(link.alloc) for link in list(c.replication.links.values())),
        events=list(c.events.events))


def _used(pool) -> int:
    return pool.num_blocks - pool.lent - pool.num_free_blocks
