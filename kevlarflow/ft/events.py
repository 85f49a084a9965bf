"""Every step of every failure and recovery, with a timestamp, in one list
that tests and benchmarks read (and the log shows)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("kevlarflow.ft")

# The kinds, in the order a recovery goes through them.
KINDS = ("failed", "detected", "aborted", "rerouted", "resumed", "first_step_after_failure",
         "replacement_started", "replacement_loaded", "rejoined", "requests_failed")


@dataclass
class Event:
    kind: str
    time: float                 # time.time()
    worker: str | None = None
    instance: int | None = None
    detail: str = ""


@dataclass
class EventLog:
    events: list[Event] = field(default_factory=list)

    def record(self, kind: str, worker: str | None = None, instance: int | None = None,
               detail: str = "") -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = Event(kind, time.time(), worker, instance, detail)
        self.events.append(event)
        log.info("%s worker=%s instance=%s %s", kind, worker, instance, detail)
        return event

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]
