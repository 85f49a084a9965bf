"""The meeting point of one generation of a communicator, which anyone can call off.

Connecting a gloo process group (or an NCCL communicator) blocks until every
member has joined, and nothing can interrupt it: a build that waits for a
member that died, or that was told to build another generation, would hold
its thread until the deadline. So the members first meet at a barrier of
their own in the generation's store namespace: each sets its "arrived" key
and waits for everyone's. Abandoning the generation marks it abandoned and
then sets every arrived key, so every member waiting there wakes at once and
gives up. Anyone who can reach the store can abandon it: a member that moved
on, or the controller, which hosts the store and knows when a member is dead.
Connecting starts only once every member has arrived, when it is quick.

Keys are relative: callers pass the generation's PrefixStore. A store client
serialises its calls (a set waits behind a wait on the same client), so a
waiter and an abandoner must use different clients.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist

_ARRIVED = "rendezvous/arrived/{}"
_ABANDONED = "rendezvous/abandoned"


class Abandoned(RuntimeError):
    """The generation was called off while this member waited for the others."""


def meet(store: dist.Store, rank: int, size: int, timeout_s: float) -> None:
    """Arrive as `rank` and wait, up to timeout_s, until all `size` members
    have arrived (torch's store error on timeout) or the generation is
    abandoned (Abandoned, with the reason given)."""
    store.set(_ARRIVED.format(rank), b"1")
    store.wait([_ARRIVED.format(r) for r in range(size)], datetime.timedelta(seconds=timeout_s))
    if store.check([_ABANDONED]):
        raise Abandoned(store.get(_ABANDONED).decode(errors="replace"))


def abandon(store: dist.Store, size: int, reason: str) -> None:
    """Call the generation off: members waiting in meet() wake and raise
    Abandoned, and later arrivals do at once. Idempotent."""
    store.set(_ABANDONED, reason.encode())
    for rank in range(size):  # completes the barrier, which wakes every waiter
        store.set(_ARRIVED.format(rank), b"")


def is_abandoned(store: dist.Store) -> bool:
    return store.check([_ABANDONED])
