"""A worker's heartbeat thread, which also watches the controller.

It tells the controller every interval that this process is alive, on a
socket of its own, and carries out abort_group and a pipeline's build_group
at once: the main thread may be blocked in an op of that very group, or in
a forward pass of another pipeline (a SIGSTOPped process sends no
heartbeats, which is how the controller tells a hang).

The other way round, a worker must not outlive its controller: the thread
tells the worker to exit when the connection to the controller drops and
does not come back within CONTROLLER_GRACE_S (a killed controller's sockets
close at once), when ZMTP heartbeats go unanswered (a controller host that
vanished, or a stopped controller), or when a locally spawned worker's
parent process is gone. It runs from the moment the worker registers, so a
worker still loading its weights is covered too. A controller that refuses
this worker's join token ends it at once, with an error that says so."""
from __future__ import annotations

import logging
import os
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message


log = logging.getLogger("kevlarflow.worker")

CONTROLLER_GRACE_S = 1.0   # a dropped connection must come back within this
ZMTP_INTERVAL_MS = 300     # transport-level pings to the controller's socket...
ZMTP_TIMEOUT_MS = 1000     # ...and how long without an answer drops the connection


class Heartbeat(threading.Thread):
    def __init__(self, worker, connect, parent_pid: int | None = None):
        """connect(**options): a new control socket to the controller."""
        super().__init__(name="kevlarflow-heartbeat", daemon=True)
        self.worker, self.parent_pid = worker, parent_pid
        self.interval_ms = 100     # until the assignment says otherwise
        self.endpoint = connect(zmq_heartbeat=(ZMTP_INTERVAL_MS, ZMTP_TIMEOUT_MS),
                                monitor_events=zmq.EVENT_HANDSHAKE_SUCCEEDED
                                | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)
        self.refused = False
        self.monitor = self.endpoint.monitor
        self.stopping = threading.Event()
        self.connected = False
        self.lost_since: float | None = time.monotonic()  # not connected yet

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.endpoint.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                name = self.worker.name
                if name is not None:
                    replication = self.worker.replication
                    self.endpoint.send("heartbeat", worker=name, replication=None
                                       if replication is None else replication.totals())
                due = time.monotonic() + self.interval_ms / 1000
                while not self.stopping.is_set() and time.monotonic() < due:
                    ready = dict(poller.poll(max(1, int((due - time.monotonic()) * 1000))))
                    if self.monitor in ready:
                        self._connection_event()
                    if self.endpoint.sock in ready:
                        message = self.endpoint.recv(0)
                        if message is not None and message["type"] == "abort_group":
                            self._abort(message)
                        elif message is not None and message["type"] == "build_group":
                            self._build(message)
                gone = self._controller_gone()
                if gone:
                    self.worker.controller_lost(gone, refused=self.refused)
                    # A main thread that does not stop (a stuck op, a long
                    # load) must not keep the process alive without a controller.
                    if not self.stopping.wait(CONTROLLER_GRACE_S):
                        log.warning("%s: exiting now", self.worker.name or "worker")
                        logging.shutdown()
                        os._exit(1 if self.refused else 0)
                    return
        finally:
            self.endpoint.close()

    def _build(self, message: dict) -> None:
        try:
            self.worker.build_pipeline(message)
        except Exception:  # noqa: BLE001  (this thread must go on beating)
            log.exception("%s: building %s failed", self.worker.label, message["group"])

    def _abort(self, message: dict) -> None:
        try:
            self.worker.abort_generation(message["group"], message["generation"])
        except Exception:  # noqa: BLE001  (this thread must go on beating)
            log.exception("%s: aborting %s failed", self.worker.label, message["group"])

    def _connection_event(self) -> None:
        event = recv_monitor_message(self.monitor)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected, self.lost_since = True, None
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.refused = True
        elif event == zmq.EVENT_DISCONNECTED and self.lost_since is None:
            self.lost_since = time.monotonic()

    def _controller_gone(self) -> str:
        """Why this worker has no controller any more ("" while it has one)."""
        if self.refused:
            return ("the controller refused this worker: its join token (--join-token or "
                    "$KEVLARFLOW_JOIN_TOKEN) is missing or not the deployment's")
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            return "the controller process is gone"
        if self.lost_since is None:
            return ""
        # Before the first connection the controller may just be starting.
        grace = CONTROLLER_GRACE_S if self.connected else self.worker.connect_timeout_s
        if time.monotonic() - self.lost_since > grace:
            return ("the connection to the controller dropped" if self.connected else
                    f"the controller did not answer within {grace:.0f} s")
        return ""
