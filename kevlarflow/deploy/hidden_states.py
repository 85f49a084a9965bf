"""Hidden states between the stages of a worker's pipelines: received from
the previous stage, sent on to the next without waiting for it, with a
bounded number of sends on their way. On a GPU, a group over Gloo stages
them through pinned host memory (comm/staging.py)."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from kevlarflow.comm.groups import WorkerGroups
from kevlarflow.comm.manager import CommError
from kevlarflow.comm.staging import Direct, staging_for

MAX_PENDING_SENDS = 4


class HiddenStates:
    def __init__(self, groups: WorkerGroups, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, report: Callable[[int, Exception], None]):
        self.groups, self.hidden_size, self.dtype = groups, hidden_size, dtype
        self.device = device
        self.report = report  # a failed send, as an error of the step it belonged to
        # (step, group, generation, op, the bytes it sends: kept until it is done)
        self.pending: deque = deque()
        self._stagings: dict[str, Direct] = {}  # per backend

    def _staging(self, group: str) -> Direct:
        backend = self.groups.backend(group)
        if backend not in self._stagings:
            self._stagings[backend] = staging_for(self.device, backend)
        return self._stagings[backend]

    # Both ops name the generation of their step: a group rebuilt on another
    # thread meanwhile refuses them (CommAborted) rather than pairing this
    # step's hidden states with another step's at the new generation's peer.
    def recv(self, group: str, generation: int, src: str, num_tokens: int) -> torch.Tensor:
        width = self.hidden_size * self.dtype.itemsize
        staging = self._staging(group)
        buffer = staging.incoming((num_tokens, width), torch.uint8)  # bytes: any dtype travels
        self.groups.manager().recv(group, buffer, src, generation=generation)
        return staging.arrived(buffer).view(self.dtype)

    def send(self, step: int, group: str, generation: int, dst: str,
             hidden: torch.Tensor) -> None:
        while len(self.pending) >= MAX_PENDING_SENDS:
            self._wait_oldest()
        payload = self._staging(group).outgoing(hidden.contiguous().view(torch.uint8))
        op = self.groups.manager().isend(group, payload, dst, generation=generation)
        self.pending.append((step, group, generation, op, payload))

    def drop_stale(self) -> None:
        """Sends on a generation that is no longer its group's current one
        (aborted, replaced, left): nobody waits for them, and each one kept
        would keep that generation's connections open (a send holds its
        Gloo context) until later sends pushed it out, which never happens
        on a borrowed worker given back, nor on any worker once the load
        stops."""
        if any(self.groups.generation(group) != generation
               for _, group, generation, _, _ in self.pending):
            self.pending = deque(p for p in self.pending
                                 if self.groups.generation(p[1]) == p[2])

    def drain(self) -> None:
        while self.pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        """A send that failed is reported as its own step's error: it may be
        of another pipeline than the step that waits for room (a borrowed
        worker sends for two)."""
        step, group, generation, op, _ = self.pending.popleft()
        try:
            op.wait()
        except CommError as error:
            if generation == self.groups.generation(group):
                self.report(step, error)
            # else: a generation given up on meanwhile; nobody waits for it
