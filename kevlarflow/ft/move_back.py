"""When an instance serving on a borrowed worker moves back to its own.

Its own worker (a replacement) is ready: the instance catches up while it
serves (the replicas of the requests running at that moment reach its own
worker), then drains (no new steps until the last of its KV is durable
there), then rejoins, recomputing nothing. Each wait has a deadline that
scales with the KV to copy. This module decides; Recovery carries out the
transitions (ft/recovery.py)."""
from __future__ import annotations

MIN_COPY_RATE = 20e6  # bytes/s a catch-up deadline allows for, at the least

CATCH_UP = "catch up"
REJOIN = "rejoin"


class MoveBack:
    def __init__(self, replication, config):
        self.replication, self.config = replication, config

    def prepare(self, instances, record, moving_back) -> None:
        """The worker of record is ready while its instance borrows another
        at its stage: that one replicates to it from now on, so that the
        instance's KV is there when it moves back. Unless the lender's
        replicas go to the own worker of another instance that is moving
        back through them (moving_back(instance): it catches up or drains):
        a worker has one backup, and that instance keeps it until it is back."""
        inst = instances[record.instance]
        s = record.stage
        if inst.workers[s] == record.name or \
                self._taken(instances, inst, s, moving_back, self.replication.ring()):
            return
        self.replication.place_after(record.name, inst.workers[s])

    def waits_for_lender(self, instances, inst, moving_back) -> bool:
        """A worker inst borrows replicates to another instance moving back
        through it: inst moves back after that one, through the same worker's
        replicas, rather than now with none of its KV at its own worker."""
        ring = self.replication.ring()
        return any(self._taken(instances, inst, s, moving_back, ring)
                   for s, (own, now) in enumerate(zip(inst.home, inst.workers)) if own != now)

    @staticmethod
    def _taken(instances, inst, s, moving_back, ring) -> bool:
        lender = inst.workers[s]
        backup = ring.get(lender)
        return backup != inst.home[s] and any(
            other is not inst and other.home[s] == backup and other.workers[s] == lender
            and moving_back(other) for other in instances)

    def copy_time(self, inst) -> float:
        """A bound on copying inst's KV at its borrowed stages to its own
        workers: its size at a conservative rate, plus replication's pace."""
        return 2 * self.config.replication_interval_s + self.config.hang_timeout_s + \
            self.replication.kv_bytes(inst) / MIN_COPY_RATE

    def can_catch_up(self, inst) -> bool:
        """Its own workers are linked to the borrowed ones: the KV can be copied."""
        return self.replication.migration_links(inst) is not None

    def caught_up(self, inst, catching: set, late: bool) -> bool:
        """The requests running when the catch-up began (`catching`) have
        their KV at its own workers, or waiting cannot help any more."""
        links = self.replication.migration_links(inst)
        return links is None or late or self.replication.caught_up(inst, links, catching)

    def flush(self, inst) -> None:
        """A draining instance's last step is back: the KV it wrote is all the
        drain waits for, and goes now, not at the next interval."""
        if inst.in_flight:
            return
        links = self.replication.migration_links(inst)
        if links:
            self.replication.flush(links)

    def after_drain(self, inst, late: bool) -> tuple[str, str] | None:
        """What a draining instance does next: (REJOIN, why), (CATCH_UP, why)
        or None, to wait on."""
        replication = self.replication
        links = replication.migration_links(inst)
        if links is None:
            return REJOIN, "its replication link closed while it drained"
        if not inst.in_flight and replication.durable(inst, links):
            dropped = replication.without_replicas(inst, links)
            return REJOIN, f"{dropped} requests found the replica pool full" if dropped else ""
        if not inst.in_flight and replication.unplanned(inst, links):
            # A step in flight when draining began was sent before the link was
            # up: waiting cannot copy its KV, one more step of the request will.
            return CATCH_UP, "KV computed before the link was up"
        if late:
            return REJOIN, (f"the copy deadline passed with {replication.behind(inst, links)} "
                            "tokens not yet at its own workers")
        return None
