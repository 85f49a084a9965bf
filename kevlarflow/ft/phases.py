"""The recovery phase of each pipeline instance, and what comes with it.

    LOADING ──all own workers ready──> BUILDING
    BUILDING ──every member acknowledged──> SERVING
    BUILDING ──a member reports failure / the build deadline──> BUILDING (retried)
    SERVING ──a member reports a communicator error──> PAUSED
    PAUSED ──no failure found within 2 hang timeouts──> BUILDING (same workers)
    SERVING on a borrowed worker ──its own worker is ready again──> CATCHING_UP
        (or straight to BUILDING on its own workers, recomputing, without a link)
    CATCHING_UP ──replicas at its own worker are in place (or deadline)──> DRAINING
    DRAINING ──nothing in flight and all its KV durable there (or deadline)──> BUILDING (own)
    CATCHING_UP, DRAINING ──its own worker fails again──> SERVING (on the borrowed one)
    any but LOADING, DOWN ──a worker it runs on fails──> BUILDING (rerouted) or DOWN
    DOWN ──a worker becomes ready and every stage has one──> BUILDING
    DOWN ──outage_timeout_s──> DOWN, its requests failed, taking no new ones
    any ──a worker it runs on fails, recovery="restart"──> RESTARTING
    RESTARTING ──all its own workers ready again──> BUILDING

Only SERVING and CATCHING_UP take steps. The router places new requests on
SERVING instances first, else on any instance that will serve without a new
worker (BUILDING, PAUSED, CATCHING_UP, DRAINING), else on a DOWN one within
its outage timeout, where they wait with its own (every instance is DOWN
then: a stage has no ready worker anywhere); LOADING and RESTARTING
instances get none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum


class Phase(str, Enum):
    LOADING = "loading"
    BUILDING = "building"
    SERVING = "serving"
    PAUSED = "paused"
    CATCHING_UP = "catching_up"
    DRAINING = "draining"
    DOWN = "down"
    RESTARTING = "restarting"

    @property
    def dispatches(self) -> bool:
        return self in (Phase.SERVING, Phase.CATCHING_UP)

    @property
    def needs_worker(self) -> bool:
        """It cannot serve until a worker joins."""
        return self in (Phase.LOADING, Phase.DOWN, Phase.RESTARTING)

    @property
    def accepts(self) -> bool:
        """New requests may be queued here: it serves, or will without a new
        worker, or (DOWN) waits for one, within outage_timeout_s."""
        return self in (Phase.SERVING, Phase.CATCHING_UP, Phase.DRAINING, Phase.BUILDING,
                        Phase.PAUSED, Phase.DOWN)


@dataclass
class InstanceRecovery:
    """Where one instance is in its recovery."""
    phase: Phase = Phase.LOADING
    since: float = field(default_factory=time.monotonic)
    deadline: float | None = None    # when the phase gives up waiting (monotonic)
    acks: set[str] = field(default_factory=set)  # BUILDING: members connected so far
    build_failures: int = 0          # BUILDING: failed builds of this route in a row
    retry_at: float | None = None    # BUILDING: when the next attempt starts
    failed_at: float | None = None   # wall time of the failure it recovers from, until it steps
    rejoining: str | None = None     # CATCHING_UP, DRAINING: the replacement it moves back to
    # CATCHING_UP: the requests running when it began, whose KV it copies (the
    # drain covers those admitted meanwhile: with requests arriving all the
    # time, waiting for every one's first copy would never end).
    catching: set = field(default_factory=set)
    # DOWN: the tokens of KV each held request lost; counted as recomputed
    # once a worker joins, for those still there (not if they fail instead).
    lost: dict = field(default_factory=dict)
    reason: str = ""                 # why it entered the phase
