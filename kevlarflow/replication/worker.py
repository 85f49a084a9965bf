"""A worker's side of KV replication.

A worker sends on at most one link (to its backup, the same-stage worker of
the next instance in the controller's ring) and receives on any number. Each
link is a two-member communicator group "repl.<source>" with a generation of
its own. The native KVReplicator packs and sends on a thread of its own; each
incoming link has a receiver thread that unpacks into this worker's replica
blocks and acknowledges the steps now durable, on a control socket of its
own (zmq sockets are not shared between threads).

The controller sends leave_group on the main socket before it turns replica
blocks into live ones: the receiver is joined before any later step runs, so
a late transfer can never write over live KV."""
from __future__ import annotations

import logging
import threading

from kevlarflow import _comm
from kevlarflow.comm.manager import CommError

log = logging.getLogger("kevlarflow.replication")


class ReplicaReceiver(threading.Thread):
    def __init__(self, replicator, connect, me: str, group: str, generation: int,
                 source: str, deadline_s: float):
        super().__init__(name=f"kevlarflow-replica-{source}", daemon=True)
        self.replicator, self.connect, self.me = replicator, connect, me
        self.group, self.generation, self.source = group, generation, source
        self.deadline_s = deadline_s

    def run(self) -> None:
        endpoint = self.connect()
        try:
            while True:
                steps = self.replicator.receive(self.group, self.source, self.deadline_s)
                if steps:
                    endpoint.send("replicated", worker=self.me, group=self.group,
                                  generation=self.generation, steps=steps)
        except (CommError, ValueError) as error:  # aborted, source gone, or a bad transfer
            log.info("%s: stopped receiving replicas from %s: %s", self.me, self.source, error)
        except RuntimeError as error:  # a device error while unpacking: said, not swallowed
            log.error("%s: stopped receiving replicas from %s: %s", self.me, self.source, error)
        finally:
            endpoint.close()


class WorkerReplication:
    def __init__(self, me: str, connect, comm, kv_caches, transfer_bytes: int,
                 interval_s: float, deadline_s: float):
        caches = [t for pair in kv_caches for t in pair]
        # connect(): a new control socket to the controller (one per thread).
        self.me, self.connect, self.comm, self.deadline_s = me, connect, comm, deadline_s
        # Keepalives well inside the deadline: an idle link is not a dead one.
        self.native = _comm.KVReplicator(comm._core, caches, transfer_bytes, deadline_s / 4,
                                         interval_s)
        self.sending: str | None = None
        self.receivers: dict[str, ReplicaReceiver] = {}

    def joined(self, group: str, members: list[str], generation: int) -> None:
        """The link's group is built: start sending or receiving on it."""
        if members[0] == self.me:
            self.native.start(group, members[1])
            self.sending = group
        else:
            receiver = ReplicaReceiver(self.native, self.connect, self.me, group, generation,
                                       members[0], self.deadline_s)
            self.receivers[group] = receiver
            receiver.start()

    def leave(self, group: str) -> None:
        """Stop the link, and wait until nothing of it writes any more."""
        if self.sending == group:
            self.native.stop()
            self.sending = None
        receiver = self.receivers.pop(group, None)
        if receiver is not None:
            self.comm.abort(group)  # wakes a receive blocked on the source
            receiver.join()

    def submit(self, spans: list[list[int]], step: int) -> None:
        """spans: (block, backup's block, first row, end row) each."""
        if self.sending is not None and spans:
            src, dst, begin, end = zip(*spans)
            self.native.submit(src, dst, step, begin, end)

    def flush(self) -> None:
        """Send what is pending now, not at the end of the interval."""
        if self.sending is not None:
            self.native.flush()

    def totals(self) -> dict:
        """Running totals of this worker's replication (thread-safe): KV bytes
        sent and received, and seconds packing, sending (packing included,
        waits too) and unpacking."""
        s = self.native.stats()
        return dict(bytes_sent=s["bytes_sent"], bytes_received=s["bytes_received"],
                    pack_s=s["pack_seconds"], send_s=s["send_seconds"],
                    unpack_s=s["unpack_seconds"])

    def close(self) -> None:
        for group in list(self.receivers) + ([self.sending] if self.sending else []):
            self.leave(group)

