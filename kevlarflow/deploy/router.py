"""Picks the pipeline instance for a new request: the serving instance with
the least outstanding work, counted in tokens still to compute (prompt tokens
not yet prefilled plus output tokens still allowed). While no instance
serves, an instance that accepts (recovering without needing a new worker,
its communicator being rebuilt, say; or waiting out an outage within its
timeout) takes the request, which then waits rather than failing; only when
none does is the request refused."""
from __future__ import annotations

from typing import Iterable, Protocol


class Routable(Protocol):
    index: int
    serving: bool
    accepting: bool

    def outstanding_tokens(self) -> int: ...


class NoInstanceServing(RuntimeError):
    """No instance takes requests: the request cannot be placed now."""


def pick_instance(instances: Iterable[Routable]) -> Routable:
    instances = list(instances)
    serving = [inst for inst in instances if inst.serving] or \
        [inst for inst in instances if inst.accepting]
    if not serving:
        raise NoInstanceServing("no pipeline instance is serving")
    # Ties go to the lowest index, so equal loads fill instances in order.
    return min(serving, key=lambda inst: (inst.outstanding_tokens(), inst.index))
