"""Which workers are alive: a heartbeat deadline catches a hung process (a
SIGSTOPped one keeps its sockets open and sends nothing); a process that
exited is seen at once by its launcher."""
from __future__ import annotations

import time


class HealthMonitor:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.last_seen: dict[str, float] = {}

    def watch(self, worker: str) -> None:
        """Start holding worker to the deadline (from now)."""
        self.last_seen[worker] = time.monotonic()

    def forget(self, worker: str) -> None:
        self.last_seen.pop(worker, None)

    def beat(self, worker: str) -> None:
        if worker in self.last_seen:
            self.last_seen[worker] = time.monotonic()

    def silent(self) -> list[tuple[str, float]]:
        """Watched workers past the deadline, with how long they have been silent."""
        now = time.monotonic()
        return [(w, now - t) for w, t in self.last_seen.items() if now - t > self.timeout_s]
