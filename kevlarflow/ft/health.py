"""Which workers are alive: a heartbeat deadline catches a hung process (a
SIGSTOPped one keeps its sockets open and sends nothing); a process that
exited is seen at once by its launcher.

A worker is watched from the moment it registers. While it loads its
weights it is held to a longer deadline: loading can keep its heartbeat
thread from the interpreter for a while on a busy machine."""
from __future__ import annotations

import time


class HealthMonitor:
    def __init__(self, timeout_s: float, loading_timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self.loading_timeout_s = loading_timeout_s or max(5.0, 5 * timeout_s)
        self.last_seen: dict[str, float] = {}
        self._timeout: dict[str, float] = {}

    def watch(self, worker: str, loading: bool = False) -> None:
        """Start holding worker to the deadline (from now)."""
        self.last_seen[worker] = time.monotonic()
        self._timeout[worker] = self.loading_timeout_s if loading else self.timeout_s

    def loaded(self, worker: str) -> None:
        """From now on the normal deadline applies."""
        if worker in self.last_seen:
            self.watch(worker)

    def forget(self, worker: str) -> None:
        self.last_seen.pop(worker, None)
        self._timeout.pop(worker, None)

    def beat(self, worker: str) -> None:
        if worker in self.last_seen:
            self.last_seen[worker] = time.monotonic()

    def silent(self) -> list[tuple[str, float]]:
        """Watched workers past their deadline, with how long they have been silent."""
        now = time.monotonic()
        return [(w, now - t) for w, t in list(self.last_seen.items())
                if now - t > self._timeout[w]]
