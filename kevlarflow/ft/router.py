"""Picks the pipeline instance for a new request: the serving instance with
the least outstanding work, counted in tokens still to compute (prompt tokens
not yet prefilled plus output tokens still allowed). An instance that is not
serving gets nothing."""
from __future__ import annotations

from typing import Iterable, Protocol


class Routable(Protocol):
    index: int
    serving: bool

    def outstanding_tokens(self) -> int: ...


class NoInstanceServing(RuntimeError):
    """Every instance is down: the request cannot be placed now."""


def pick_instance(instances: Iterable[Routable]) -> Routable:
    serving = [inst for inst in instances if inst.serving]
    if not serving:
        raise NoInstanceServing("no pipeline instance is serving")
    # Ties go to the lowest index, so equal loads fill instances in order.
    return min(serving, key=lambda inst: (inst.outstanding_tokens(), inst.index))
