"""The communicator groups of one worker: those connected, with their members
and generation, and those being built.

Builds run in the background (CommManager.start_build), so a worker keeps
running the steps of its other groups while one connects, and a build that
can no longer complete is called off at once: when a newer generation of the
same group is asked for, when the group is left, or when the controller
aborts that generation (from the heartbeat thread). Any thread may start a
build (one at a time; a generation older than the one there is ignored) or
abort one; the main thread collects the finished ones (a hook hears of each
as it ends, on its own thread)."""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from kevlarflow.comm.build import Build
from kevlarflow.comm.manager import CommManager


class WorkerGroups:
    def __init__(self, make_manager: Callable[[], CommManager],
                 ended: Callable[[Build], None]):
        self._make_manager = make_manager
        self._manager: CommManager | None = None
        self._ended_hook = ended  # told of each build as it ends, on its thread
        self._lock = threading.Lock()
        self._building_one = threading.Lock()  # build() calls, one at a time
        self._making = threading.Lock()        # of the manager
        self._latest: dict[str, int] = {}  # newest generation asked for, per group
        self._built: dict[str, tuple[list[str], int]] = {}
        self._building: dict[str, Build] = {}
        self._finished: deque[Build] = deque()
        self._known: set[str] = set()  # every group ever asked for

    def build(self, group: str, members: list[str], generation: int,
              backend: str | None = None) -> bool:
        """Start connecting `generation` of `group` (over `backend`, default
        the manager's); whatever generation of it was there or being built is
        given up. False (nothing done) if a newer generation was asked for
        already: the request came the slow way."""
        with self._building_one:
            with self._lock:
                if self._latest.get(group, -1) >= generation:
                    return False
                self._latest[group] = generation
            self.stop(group, f"generation {generation} replaces it")
            if len(members) == 1:  # a one-member pipeline talks to no one: built at once
                build = _Alone(group, members, generation)
            else:
                build = self.manager().start_build(group, members, generation,
                                                   on_done=self._ended, backend=backend)
            with self._lock:
                self._known.add(group)
                self._building[group] = build
        if isinstance(build, _Alone):
            self._ended(build)
        return True

    def _ended(self, build: Build) -> None:  # on the build's thread
        with self._lock:
            self._finished.append(build)  # before the hook: collect() can see it then
        self._ended_hook(build)

    def collect(self) -> list[Build]:
        """Builds that ended since the last call and are still wanted (not
        replaced, stopped or aborted meanwhile); connected ones are current now."""
        with self._lock:
            ended = list(self._finished)
            self._finished.clear()
            wanted = []
            for build in ended:
                if self._building.get(build.group) is not build:
                    continue
                del self._building[build.group]
                if build.error is None:
                    self._built[build.group] = (build.members, build.generation)
                wanted.append(build)
        return wanted

    def stop(self, group: str, reason: str) -> None:
        """No generation of group is current or being built after this."""
        with self._lock:
            build = self._building.pop(group, None)
            had = self._built.pop(group, None) is not None
        if build is not None:
            build.cancel(reason)
        elif had and self._manager is not None:
            self._manager.abort(group)

    def abort(self, group: str, generation: int, reason: str) -> bool:
        """Give up on that generation of group if it is the current one or the
        one being built (a newer one is left alone). Any thread; never blocks.
        True if it was."""
        with self._lock:
            build = self._building.get(group)
            if build is not None:
                if build.generation != generation:
                    return False  # another one is being built; that one is retired already
                del self._building[group]
            elif self._built.get(group, (None, None))[1] == generation:
                del self._built[group]
            else:
                return False
        if build is not None:
            build.cancel(reason)
        elif self._manager is not None:
            self._manager.abort(group, generation)
        return True

    def manager(self) -> CommManager:
        """The communicator manager, made when the first group needs it: the
        store and the data plane are not needed before."""
        with self._making:
            if self._manager is None:
                self._manager = self._make_manager()
        return self._manager

    def abort_all(self) -> None:
        """Every op of every group fails at once; nothing is told to the
        store (whose host may be gone). Any thread; never blocks."""
        if self._manager is not None:
            self._manager.close()

    def close(self) -> None:
        """Calls off every build and aborts every group; never blocks."""
        with self._lock:
            building = list(self._building.values())
            self._building.clear()
            self._built.clear()
        for build in building:
            build.cancel("the worker is closing")
        if self._manager is not None:
            self._manager.close()

    def known(self, group: str) -> bool:
        with self._lock:
            return group in self._known

    def members(self, group: str) -> list[str] | None:
        with self._lock:
            entry = self._built.get(group)
        return None if entry is None else entry[0]

    def generation(self, group: str) -> int | None:
        with self._lock:
            entry = self._built.get(group)
        return None if entry is None else entry[1]

    def backend(self, group: str) -> str:
        """The backend `group` runs over (a group of one: none, "gloo")."""
        return self._manager.backend_of(group) if self._manager is not None else "gloo"

    def __len__(self) -> int:
        with self._lock:
            return len(self._built)


class _Alone:
    """The build of a group of one member, which needs no communicator."""

    def __init__(self, group: str, members: list[str], generation: int):
        self.group, self.members, self.generation = group, members, generation
        self.error = None
        self.cancelled = False

    def cancel(self, reason: str) -> None:
        pass
