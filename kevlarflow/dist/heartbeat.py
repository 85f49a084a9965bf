"""A worker's heartbeat thread."""
from __future__ import annotations

import threading

from kevlarflow.dist.control import WorkerEndpoint


class Heartbeat(threading.Thread):
    """Tells the controller every interval that this process is alive, on a
    socket of its own, and carries out abort_group at once: the main thread
    may be blocked in an op of that very group (a SIGSTOPped process sends
    no heartbeats, which is how the controller tells a hang)."""

    def __init__(self, worker, controller: str, interval_s: float):
        super().__init__(name="kevlarflow-heartbeat", daemon=True)
        self.worker, self.interval_ms = worker, max(1, int(interval_s * 1000))
        self.endpoint = WorkerEndpoint(controller)
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.endpoint.send("heartbeat", worker=self.worker.name)
                message = self.endpoint.recv(self.interval_ms)
                if message is not None and message["type"] == "abort_group":
                    self.worker.abort_generation(message["group"], message["generation"])
        finally:
            self.endpoint.close()
