"""Every step of every failure and recovery, with a timestamp, in one list
that tests and benchmarks read (and the log shows). The list keeps the most
recent MAX_EVENTS; counts per kind cover the whole run."""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

log = logging.getLogger("kevlarflow.ft")

# The kinds, in the order a recovery goes through them.
KINDS = ("failed", "detected", "aborted", "rerouted", "resumed", "first_step_after_failure",
         "replacement_started", "replacement_loaded", "rejoined", "requests_failed")
MAX_EVENTS = 10_000


@dataclass
class Event:
    kind: str
    time: float                 # time.time()
    worker: str | None = None
    instance: int | None = None
    detail: str = ""


@dataclass
class EventLog:
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    _counts: Counter = field(default_factory=Counter)

    def record(self, kind: str, worker: str | None = None, instance: int | None = None,
               detail: str = "") -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = Event(kind, time.time(), worker, instance, detail)
        self.events.append(event)
        self._counts[kind] += 1
        log.info("%s worker=%s instance=%s %s", kind, worker, instance, detail)
        return event

    def of(self, kind: str) -> list[Event]:
        return [e for e in list(self.events) if e.kind == kind]

    def counts(self) -> dict[str, int]:
        return dict(self._counts)


def recovery_times(events) -> list[float]:
    """MTTR of each recovery that completed a step: from the injected fault,
    if there was one, else from its detection, to the instance's first step
    after it."""
    out = []
    failed: dict[int | None, float] = {}    # instance -> its last injected fault
    detected: dict[int | None, float] = {}  # instance -> its last detection
    for event in events:
        if event.kind == "failed":
            failed[event.instance] = event.time
        elif event.kind == "detected":
            detected[event.instance] = event.time
        elif event.kind == "first_step_after_failure":
            start = failed.get(event.instance) or detected.get(event.instance)
            if start is not None:
                out.append(event.time - start)
    return out
