"""New processes for failed worker slots.

The first replacement of a slot starts after the deployment's replacement
delay (0 by default: at once, on the same machine). One that dies before it
is ready (it crashed while starting, was killed while loading, never
registered) is replaced again after that delay plus a backoff that doubles
each time, up to MAX_BACKOFF_S: a slot whose processes keep dying is retried
for as long as the deployment runs, without spinning."""
from __future__ import annotations

import time
from typing import Callable

from kevlarflow.ft.events import EventLog

MAX_BACKOFF_S = 30.0


def backoff_s(attempt: int) -> float:
    """The wait before attempt number `attempt` (1, 2, ...) of one slot."""
    return 0.0 if attempt <= 1 else min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 2))


class Replacements:
    def __init__(self, spawn: Callable[[str], bool], instance_of: Callable[[str], int],
                 events: EventLog, clock: Callable[[], float] = time.monotonic,
                 delay_s: float = 0.0):
        self._clock = clock
        self.delay_s = delay_s
        self._spawn = spawn              # starts a process for the slot; False if none can be
        self._instance_of = instance_of
        self._events = events
        self.attempts: dict[str, int] = {}   # slot -> replacements since it was last ready
        self._due: dict[str, float] = {}     # slot -> when its next process starts

    def start(self, name: str) -> None:
        """The slot needs a new process (after its backoff)."""
        attempt = self.attempts.get(name, 0) + 1
        self.attempts[name] = attempt
        self._due[name] = self._clock() + self.delay_s + backoff_s(attempt)
        self.tick()

    def tick(self) -> None:
        now = self._clock()
        for name, due in list(self._due.items()):
            if now < due:
                continue
            del self._due[name]
            if self._spawn(name):
                self._events.record("replacement_started", worker=name,
                                    instance=self._instance_of(name),
                                    detail=f"attempt {self.attempts[name]}")

    def ready(self, name: str) -> bool:
        """The slot's process loaded; True if it was a replacement."""
        self._due.pop(name, None)
        return self.attempts.pop(name, None) is not None

    def pending(self) -> bool:
        return bool(self.attempts)
