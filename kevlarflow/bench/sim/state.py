"""The simulator's state: the requests it serves, the failures it is given,
and what it keeps per sequence, per round and per instance."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MODES = ("kevlarflow", "kevlarflow-no-replication", "restart")
FAULTS = ("kill", "hang")

WAITING, PREFILL, DECODE, DONE = range(4)
INF = float("inf")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Failure:
    at_s: float
    instance: int
    stage: int
    kind: str = "kill"


class Seq:
    __slots__ = ("idx", "arrival", "prompt", "output", "pending", "emitted", "first", "last",
                 "state", "r_join", "epoch", "chunk")

    def __init__(self, idx: int, req: TraceRequest):
        self.idx, self.arrival = idx, req.arrival_s
        self.prompt, self.output = req.prompt_tokens, req.output_tokens
        self.pending = self.prompt  # tokens to compute before the next output token
        self.emitted = 0            # output tokens (for DECODE: as of r_join)
        self.first = self.last = None
        self.state = WAITING
        self.r_join = 0
        self.epoch = 0              # bumped when it leaves DECODE: stale heap entries
        self.chunk = 0              # tokens it took in its last round

    def computed(self) -> int:
        return self.prompt + self.emitted - self.pending

    def outstanding(self) -> int:
        """What the router counts: prompt not yet computed plus output to come."""
        return max(0, self.pending - self.emitted) + self.output - self.emitted


class Round:
    __slots__ = ("start", "length", "count", "chunks", "id", "first_s")

    def __init__(self, start, length, count, chunks, rid, first_s=None):
        self.start, self.length, self.count, self.chunks, self.id = start, length, count, chunks, rid
        # after start, when its first micro-batch is back (the first step after a failure)
        self.first_s = length if first_s is None else first_s


class InstanceState:
    def __init__(self, index: int):
        self.index = index
        self.waiting: deque[Seq] = deque()
        self.prefilling: list[Seq] = []
        self.decoding: set[Seq] = set()
        self.finish_heap: list = []
        self.R = 0                  # rounds completed
        self.decode_base = 0        # sum over decoding of (output - emitted + r_join)
        self.other_outstanding = 0  # outstanding tokens of waiting and prefilling ones
        self.up = True              # can run rounds
        self.routable = True        # the router may send it requests
        self.round: Round | None = None
        self.round_ids = 0
        self.partner: int | None = None  # the instance it shares a worker with
        self.load = (0, 0.0, 0.0)   # its last round: micro-batches, prefill, decode tokens
        self.last_round_s = 0.0
        self.failed_at: float | None = None
        self.resumed_at = 0.0       # when it last resumed after a failure
        self.recovering = False

    def outstanding(self) -> int:
        return self.other_outstanding + self.decode_base - len(self.decoding) * self.R

    def running(self) -> list[Seq]:
        return self.prefilling + list(self.decoding)
