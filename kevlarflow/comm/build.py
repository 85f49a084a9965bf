"""One generation of a group being connected on a thread of its own
(CommManager.start_build makes it), and called off from any thread."""
from __future__ import annotations

import threading
import traceback
from typing import Callable

from kevlarflow import _comm


class Build:
    """connect() connects and installs the generation, raising a CommError
    if it cannot; call_off(reason) gives it up for every member, never
    blocking on a peer. on_done(build) is called on the build's thread once
    it ends, however it ends: then `error` is None (connected and installed)
    or the CommError."""

    def __init__(self, group: str, members: list[str], generation: int, backend: str, *,
                 connect: Callable[[], None], call_off: Callable[[str], None],
                 on_done: Callable[["Build"], None] | None = None):
        self.group, self.members, self.generation = group, members, generation
        self.backend = backend
        self.error: _comm.CommError | None = None
        self._connect, self._call_off, self._on_done = connect, call_off, on_done
        self._done = threading.Event()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"kevlarflow-build-{group}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._connect()
        except _comm.CommError as error:
            self.error = _without_locals(error)
        finally:
            self._done.set()
            if self._on_done is not None:
                self._on_done(self)

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, reason: str) -> None:
        """Give up on this generation here and call it off for every member;
        never blocks on a peer. Ops of the group fail as aborted after it."""
        if self._cancelled or self._done.is_set():
            return
        self._cancelled = True
        self._call_off(reason)

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the build ends; raises its CommError if it failed."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"build of {self.group!r} generation {self.generation} still running")
        if self.error is not None:
            raise self.error


def _without_locals(error: BaseException) -> BaseException:
    """error, its traceback kept but cleared of the locals of the frames it
    went through (down its causes). A failed build's error is kept for
    whoever reports it, and its traceback reaches back to the build through
    a reference cycle, which only a garbage collection breaks: the store
    client and process group in those frames would hold a connection to the
    deployment's store, and gloo's threads, until then."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__
    return error
