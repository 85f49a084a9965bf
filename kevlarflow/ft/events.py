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
         "replacement_started", "replacement_loaded", "rejoined", "requests_held",
         "requests_failed")
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


def failure_timings(events: list[tuple[str, float, int | None, str | None]]) -> list[dict]:
    """Per failure (a detection): its start (at: the injected fault that
    caused it, if one did, else the detection itself), its instance, and in
    seconds from its start: to the
    detection (detect_s), to its instance's communicator being up again
    (resumed_s) and to that instance's first completed step (mttr_s, the
    time to recovery); None where that never happened. events: (kind, time,
    instance, worker) in time order."""
    out = []
    injected: dict[str | None, float] = {}  # worker -> its last injected fault
    for k, (kind, t, instance, worker) in enumerate(events):
        if kind == "failed":
            injected[worker] = t
        if kind != "detected":
            continue
        start = injected.pop(worker, t)

        def after(wanted: str) -> float | None:
            return next((t2 - start for kind2, t2, inst2, _ in events[k:]
                         if kind2 == wanted and inst2 == instance and t2 >= t), None)
        out.append(dict(at=start, instance=instance, detect_s=t - start,
                        resumed_s=after("resumed"), mttr_s=after("first_step_after_failure")))
    return out
