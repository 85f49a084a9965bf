"""A worker's read-ahead queue: the control messages it has received but not
handled yet. The worker reads ahead to find a step of another pipeline to
run in the same forward pass (a borrowed worker serves two), and to let the
first steps after a failure go ahead of the lender's."""
from __future__ import annotations

from collections import deque
from typing import Callable


class ReadAhead:
    def __init__(self, endpoint, poll_ms: int, collect_builds: Callable[[], None]):
        """collect_builds(): make the builds that ended current. A build
        reported ready before a step on it was sent must be collected before
        that step runs: else the step would look stale here while the
        previous stage runs it, and the pipeline's sends would pair wrongly."""
        self.endpoint, self.poll_ms, self.collect_builds = endpoint, poll_ms, collect_builds
        self.queue: deque = deque()

    def take_in(self) -> None:
        """Queue what has arrived, without waiting."""
        message = self.endpoint.recv(0)
        while message is not None:
            self.queue.append(message)
            message = self.endpoint.recv(0)
        self.collect_builds()

    def next(self) -> dict | None:
        """The next message to handle: the queue's, in order but for a
        priority step (next_index); else the next to arrive, within poll_ms."""
        self.take_in()
        if not self.queue:
            message = self.endpoint.recv(self.poll_ms)
            self.collect_builds()
            return message
        k = next_index(self.queue)
        message = self.queue[k]
        del self.queue[k]
        return message

    def merge_partner(self, group: str) -> dict | None:
        """The next step of another pipeline, if it is already queued and
        nothing that must run before it (a rebuild, a shutdown) is in the way."""
        self.take_in()
        for i, message in enumerate(self.queue):
            if message["type"] != "step":
                return None
            if message["group"] != group:
                del self.queue[i]
                return message
        return None


def next_index(queue) -> int:
    """Index in the queue of the message to handle next: the first, unless a
    priority step (the first steps of an instance after a failure, on the
    worker it borrowed) waits behind steps of other pipelines. It then goes
    ahead of them: their inputs may still be on their way, while its instance
    has waited since the failure. What it must follow still goes first, in
    order: the leaves of replication links (the takeover of their blocks), if
    none concerns a pipeline it passes. It never passes a step of its own
    pipeline nor any other message (a rebuild, a shutdown)."""
    queue = list(queue)
    k = next((i for i, m in enumerate(queue) if m["type"] == "step" and m["priority"]), None)
    if k is None:
        return 0
    passed = {m["group"] for m in queue[:k] if m["type"] == "step"}
    if queue[k]["group"] in passed or any(
            m["type"] != "step" and (m["type"] != "leave_group" or m["group"] in passed)
            for m in queue[:k]):
        return 0
    return next((i for i, m in enumerate(queue[:k]) if m["type"] != "step"), k)
