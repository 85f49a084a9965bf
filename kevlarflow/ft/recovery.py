"""Recovery from worker failures: one state machine per pipeline instance
(its phases and transitions are in phases.py and docs/recovery.md).

KevlarFlow's recovery (recovery="kevlarflow"): the failed worker's
communicators are aborted on every survivor and called off in the store, so
nothing waits for it; each instance that ran on it borrows the same-stage
worker of a healthy instance (its backup in the replication ring, when it
has one), which then serves both pipelines from one KV pool; only the
affected instance's communicator is rebuilt; survivors keep their weights
and their KV. At the failed stage the borrowed worker's replicas become live
blocks, and each request recomputes only the tokens past its replication
watermark, as a chunked prefill through the pipeline.

A replacement starts at once, loads in the background and joins. The
instance moves back once its requests' KV is at the replacement (move_back.py
decides when): it catches up while serving, then drains, so the move
recomputes nothing; a deadline that scales with the KV to copy bounds the
wait, and a move that recomputes says why.

Every wait is bounded and abandoned as soon as it cannot complete: a build
is called off when a member fails and retried when it fails by itself; a
new fault in any phase leads to a defined next phase. When a stage has no
ready worker left anywhere, the instances go down holding their requests
(and new ones), which recompute from scratch once a worker joins; they fail
only if that takes longer than outage_timeout_s.

The baseline (recovery="restart") is today's stacks: the whole instance goes
down, every one of its workers is replaced (new processes, weights loaded
from disk, communicators made again) and its requests wait and recompute
from scratch; the router sends new requests to live instances meanwhile."""
from __future__ import annotations

import logging
import time

from kevlarflow.ft.move_back import CATCH_UP, MoveBack
from kevlarflow.ft.phases import InstanceRecovery, Phase
from kevlarflow.ft.replacements import Replacements
from kevlarflow.ft.reroute import KVMove, move_kv, plan_route
from kevlarflow.ft.view import DeploymentView, RecoveryStats

log = logging.getLogger("kevlarflow.ft")

MAX_BUILD_BACKOFF_S = 2.0  # between retries of a build that keeps failing
MOVING_BACK = "moving back"  # the reason of the build that ends a move back
FIRST_STEP_PRIORITY_S = 0.5  # the longest a lender holds its steps back for a first step


class Recovery:
    def __init__(self, deployment: DeploymentView, clock=time.monotonic):
        self.d = deployment
        self.config = deployment.config
        self.clock = clock  # deadlines and delays (tests pass a clock of their own)
        self.states = [InstanceRecovery(since=clock()) for _ in deployment.instances]
        self.replacements = Replacements(lambda name: deployment.spawn(name),
                                         lambda name: deployment.workers[name].instance,
                                         deployment.events, clock,
                                         delay_s=self.config.replacement_delay_s)
        self.stats = RecoveryStats()
        self.move_back = MoveBack(deployment.replication, self.config)

    def phase(self, inst) -> Phase:
        return self.states[inst.index].phase

    # Workers -----------------------------------------------------------------

    def worker_ready(self, name: str) -> None:
        """A worker loaded (at start-up, or a replacement)."""
        if self.replacements.ready(name):
            self.d.events.record("replacement_loaded", worker=name,
                                 instance=self.d.workers[name].instance)
        self.move_back.prepare(self.d.instances, self.d.workers[name], self._moving_back)
        self.d.replication.reform()
        for inst in self.d.instances:
            phase = self.phase(inst)
            if phase in (Phase.LOADING, Phase.RESTARTING):
                if all(self.d.workers.ready(w) for w in inst.home):
                    # New processes: their pools are new too.
                    inst.use_workers(inst.home, [self.d.pools[w] for w in inst.home])
                    self._build(inst, inst.home, "starting")
                    if phase is Phase.RESTARTING:
                        self.d.events.record("rejoined", worker=name, instance=inst.index,
                                             detail="restarted on new workers")
            elif phase is Phase.DOWN:
                self._reroute(inst, f"{name} joined")
            elif phase is Phase.SERVING and name in inst.home:
                self._consider_rejoin(inst)

    def worker_lost(self, name: str, reason: str) -> None:
        """A registered worker failed (its process exited, or went silent)."""
        record = self.d.workers[name]
        if not record.live:
            return  # handled already
        self.d.events.record("detected", worker=name, instance=record.instance, detail=reason)
        was_ready = record.ready
        self.d.discard(name)
        if self.config.recovery == "restart":
            inst = self.d.instances[record.instance]
            if self.phase(inst) is Phase.RESTARTING:
                self.replacements.start(name)  # one of its replacements died
            else:
                self._restart(inst, f"{name} failed")
            return
        self.replacements.start(name)
        if not was_ready:
            return  # a replacement that was still loading: nothing ran on it
        for inst in self.d.instances:
            st = self.states[inst.index]
            if name in inst.workers and st.phase not in (Phase.LOADING, Phase.DOWN):
                self._reroute(inst, f"{name} failed", failure=True)
            elif name == st.rejoining:  # the replacement it was moving back to
                self._enter(inst, Phase.SERVING, f"{name} failed before the move back")
        self.d.replication.reform()

    def replacement_died(self, name: str, reason: str) -> None:
        """A process started for the slot is gone before it registered."""
        record = self.d.workers[name]
        self.d.events.record("detected", worker=name, instance=record.instance,
                             detail=f"replacement {reason}")
        self.d.discard(name)
        self.replacements.start(name)

    # Communicators --------------------------------------------------------------

    def group_ready(self, inst, generation: int, worker: str) -> None:
        st = self.states[inst.index]
        if st.phase is not Phase.BUILDING or generation != inst.generation \
                or worker not in inst.workers:
            return  # an acknowledgement of a generation given up on
        st.acks.add(worker)
        if not st.acks.issuperset(inst.workers):
            return
        log.info("instance %d serving: %s", inst.index, " -> ".join(inst.workers))
        if st.failed_at is not None:
            moved = f" ({MOVING_BACK})" if st.reason == MOVING_BACK else ""
            self.d.events.record("resumed", instance=inst.index,
                                 detail=" -> ".join(inst.workers) + moved)
        self._enter(inst, Phase.SERVING, "connected")
        self._consider_rejoin(inst)

    def group_failed(self, inst, generation: int, worker: str, message: str) -> None:
        if self.phase(inst) is Phase.BUILDING and generation == inst.generation:
            self._build_failed(inst, f"{worker}: {message}")

    def comm_error(self, inst, worker: str, message: str) -> None:
        """A step of inst failed in a communicator op at worker. Some member
        of inst's pipeline is dead or hung, not necessarily the reporter: the
        health monitor finds which. The generation is broken, so it is
        aborted at once (its members blocked in it wake up, and a borrowed
        one goes on with its other pipeline); inst pauses until the failed
        member is known. (Only inst: the reporter may serve another one.)"""
        if self.phase(inst) in (Phase.SERVING, Phase.CATCHING_UP, Phase.DRAINING):
            self.d.abort_generation(inst, f"{worker}: {message}")
            self.d.events.record("aborted", instance=inst.index,
                                 detail=f"communicator error at {worker}")
            inst.abandon_in_flight()
            self._enter(inst, Phase.PAUSED, f"{worker}: {message}",
                        deadline=2 * self.config.hang_timeout_s)

    def step_completed(self, inst) -> None:
        st = self.states[inst.index]
        if st.phase is Phase.DRAINING:
            self.move_back.flush(inst)
        if st.failed_at is not None:
            self.d.events.record("first_step_after_failure", instance=inst.index,
                                 detail=f"{time.time() - st.failed_at:.3f} s after its detection")
            st.failed_at = None

    # Time ------------------------------------------------------------------------

    def tick(self) -> None:
        """Deadlines and retries; the controller calls it every round."""
        self.replacements.tick()
        now = self.clock()
        for inst, st in zip(self.d.instances, self.states):
            late = st.deadline is not None and now > st.deadline
            if st.phase is Phase.BUILDING:
                if st.retry_at is not None and now >= st.retry_at:
                    st.retry_at = None
                    self._build(inst, inst.workers, "retrying", keep_failures=True)
                elif st.retry_at is None and late:
                    self._build_failed(inst, f"not connected within {self.config.comm_deadline_s} s")
            elif st.phase is Phase.PAUSED and late:
                self._reroute(inst, "communicator error without a failed worker")
            elif st.phase is Phase.DOWN and late:
                self._give_up(inst)
            elif st.phase is Phase.CATCHING_UP:
                if self.move_back.caught_up(inst, st.catching, late):
                    self._enter(inst, Phase.DRAINING, "catch-up deadline passed" if late else
                                "replicas caught up", deadline=self.move_back.copy_time(inst))
                    self.move_back.flush(inst)
            elif st.phase is Phase.DRAINING:
                self._after_drain(inst, late)
            elif st.phase is Phase.SERVING:
                self._retry_move_back(inst)

    def awaits_first_step(self, inst) -> bool:
        """inst serves again after a failure and has not completed a step yet:
        its steps carry the interrupted requests only, and go ahead of other
        pipelines' at a worker they share."""
        st = self.states[inst.index]
        return st.failed_at is not None and st.phase is Phase.SERVING

    def yields(self, inst) -> bool:
        """inst lends a worker to an instance that has resumed after a
        failure and not yet completed a step: inst starts no step of its own
        meanwhile (for at most FIRST_STEP_PRIORITY_S), so that the first step
        after the failure is not queued at the borrowed worker behind inst's
        micro-batches. MTTR ends with that step."""
        now = self.clock()
        shared = set(inst.workers)
        return any(other is not inst and st.failed_at is not None
                   and st.phase is Phase.SERVING and now - st.since < FIRST_STEP_PRIORITY_S
                   and shared & set(other.workers)
                   and (other.in_flight or other.scheduler.has_work())
                   for other, st in zip(self.d.instances, self.states))

    def busy(self) -> bool:
        """Something is under way that the controller should poll for (a
        DOWN instance while it waits out its outage timeout, not after)."""
        return self.replacements.pending() or any(
            st.phase is not Phase.SERVING and not (st.phase is Phase.DOWN and st.deadline is None)
            for st in self.states)

    # Transitions -------------------------------------------------------------------

    def _enter(self, inst, phase: Phase, reason: str, deadline: float | None = None) -> None:
        st = self.states[inst.index]
        if phase is not Phase.BUILDING:
            st.build_failures, st.retry_at = 0, None
        if phase not in (Phase.CATCHING_UP, Phase.DRAINING):
            st.rejoining = None
        st.catching = set(inst.running()) if phase is Phase.CATCHING_UP else set()
        st.phase, st.since, st.reason = phase, self.clock(), reason
        st.deadline = None if deadline is None else st.since + deadline
        inst.serving, inst.accepting = phase.dispatches, phase.accepts
        log.debug("instance %d: %s (%s)", inst.index, phase.value, reason)

    def _build(self, inst, route: list[str], reason: str, keep_failures: bool = False) -> None:
        st = self.states[inst.index]
        failures = st.build_failures if keep_failures else 0
        self._enter(inst, Phase.BUILDING, reason, deadline=self.config.comm_deadline_s)
        st.build_failures, st.acks = failures, set()
        self.d.build(inst, route)

    def _build_failed(self, inst, why: str) -> None:
        """Try again, on the same workers: a member that died will be found
        by the health monitor and reroute the instance meanwhile."""
        st = self.states[inst.index]
        log.warning("instance %d: building generation %d failed (%s); retrying", inst.index,
                    inst.generation, why)
        self.d.abort_generation(inst, f"build failed: {why}")
        st.build_failures += 1
        backoff = min(MAX_BUILD_BACKOFF_S, 0.1 * 2 ** (st.build_failures - 1))
        st.retry_at, st.deadline = self.clock() + backoff, None

    def _reroute(self, inst, reason: str, failure: bool = False) -> None:
        """Run inst on ready workers, its own where it can; rebuild its
        communicator. DOWN when some stage has no ready worker."""
        st = self.states[inst.index]
        if failure and st.failed_at is None:
            st.failed_at = time.time()
        if inst.generation >= 0 or self.phase(inst) is Phase.BUILDING:
            self.d.abort_generation(inst, reason)
            self.d.events.record("aborted", instance=inst.index, detail=reason)
        inst.abandon_in_flight()
        workers = self.d.workers
        lenders = [[o.home[s] for o in self.d.instances if o is not inst]
                   for s in range(len(inst.home))]
        route, missing = plan_route(inst.home, inst.workers, workers.ready,
                                    self.d.replication.backup_of, lenders)
        if route is None:
            if self.phase(inst) is not Phase.DOWN:  # else it keeps its deadline
                self._down(inst, f"no live worker for stage {missing}")
            return
        self.stats.tokens_recomputed += sum(n for seq, n in st.lost.items()
                                            if seq in inst.sequences)
        st.lost = {}
        if route == inst.home and inst.workers != inst.home:
            self._rejoin(inst, f"moved back while recovering from: {reason}")
            return
        move = self._move(inst, route)
        self._build(inst, route, "rerouted")
        if route != inst.home:
            self.d.events.record("rerouted", instance=inst.index,
                                 detail=" -> ".join(route) + f"; {move}")

    def _move(self, inst, route: list[str]) -> KVMove:
        move = move_kv(inst, route, self.d.pools, self.d.replication, self.stats.moved)
        self.stats.tokens_restored += move.restored
        self.stats.tokens_recomputed += move.recomputed
        self.stats.requests_restored += move.requests_restored
        return move

    def _down(self, inst, reason: str) -> None:
        """No ready worker is left for some stage: inst's requests lose their
        KV (that stage's is gone everywhere) and wait, with new ones, for a
        worker to join, then recompute from scratch; for at most
        outage_timeout_s, after which they fail (_give_up)."""
        self.states[inst.index].lost = {seq: seq.num_computed_tokens for seq in inst.running()}
        inst.preempt_all()
        self._enter(inst, Phase.DOWN, reason, deadline=self.config.outage_timeout_s)
        if not self.config.outage_timeout_s:
            self._give_up(inst)
        elif inst.sequences:
            self.d.events.record("requests_held", instance=inst.index,
                                 detail=f"{len(inst.sequences)} requests: {reason}; they wait "
                                        f"for one for at most {self.config.outage_timeout_s:g} s")

    def _give_up(self, inst) -> None:
        """The outage outlasted outage_timeout_s: inst's requests fail, and
        it takes no new ones until a worker joins."""
        st = self.states[inst.index]
        timeout = self.config.outage_timeout_s
        self.d.fail_requests(inst, st.reason + (f" for {timeout:g} s" if timeout else ""))
        st.deadline, st.lost = None, {}
        inst.accepting = False

    def _restart(self, inst, reason: str) -> None:
        """The baseline: every worker of the instance is replaced, and its
        requests start again from scratch."""
        st = self.states[inst.index]
        if st.failed_at is None:
            st.failed_at = time.time()
        if inst.generation >= 0 or self.phase(inst) is Phase.BUILDING:
            self.d.abort_generation(inst, reason)
        self.d.events.record("aborted", instance=inst.index, detail=reason)
        self.stats.tokens_recomputed += sum(seq.num_computed_tokens for seq in inst.running())
        inst.preempt_all()
        inst.use_workers(inst.home, [self.d.pools[w] for w in inst.home])
        self._enter(inst, Phase.RESTARTING, reason)
        for name in inst.home:
            self.d.discard(name)
            self.replacements.start(name)

    # Moving back to a replacement ----------------------------------------------------

    def _can_move_back(self, inst) -> bool:
        """inst runs on a borrowed worker and its own are all ready."""
        return inst.workers != inst.home and all(self.d.workers.ready(w) for w in inst.home)

    def _consider_rejoin(self, inst) -> None:
        """inst serves on a borrowed worker and its own are all ready again."""
        if not self._can_move_back(inst):
            return
        if not self.move_back.can_catch_up(inst):
            if self.move_back.waits_for_lender(self.d.instances, inst, self._moving_back):
                log.info("instance %d moves back once another instance has moved back through "
                         "the worker both borrow", inst.index)
                return
            self._rejoin(inst, "no replication link to its own worker")
            return
        replacement = next(own for own, now in zip(inst.home, inst.workers) if own != now)
        self._enter(inst, Phase.CATCHING_UP, f"{replacement} is ready",
                    deadline=self.move_back.copy_time(inst))
        self.states[inst.index].rejoining = replacement

    def _retry_move_back(self, inst) -> None:
        """inst waited for another instance to move back through a worker
        both borrow: once that one is back, the worker replicates to inst's
        own, and inst moves back in turn."""
        if not self._can_move_back(inst) or self.move_back.can_catch_up(inst) \
                or self.move_back.waits_for_lender(self.d.instances, inst, self._moving_back):
            return
        for own in inst.home:
            self.move_back.prepare(self.d.instances, self.d.workers[own], self._moving_back)
        self.d.replication.reform()
        self._consider_rejoin(inst)

    def _moving_back(self, inst) -> bool:
        return self.phase(inst) in (Phase.CATCHING_UP, Phase.DRAINING)

    def _after_drain(self, inst, late: bool) -> None:
        decision = self.move_back.after_drain(inst, late)
        if decision is None:
            return
        what, why = decision
        if what == CATCH_UP:
            self._enter(inst, Phase.CATCHING_UP, why, deadline=self.move_back.copy_time(inst))
        else:
            self._rejoin(inst, why)

    def _rejoin(self, inst, why: str) -> None:
        """Move inst back to its own workers; at each stage it borrowed, its
        own worker takes over its replicas of the borrowed one."""
        returning = [own for own, now in zip(inst.home, inst.workers) if own != now]
        self.d.abort_generation(inst, f"{', '.join(returning)} rejoins")
        inst.abandon_in_flight()
        move = self._move(inst, inst.home)
        self._build(inst, inst.home, MOVING_BACK)
        self.d.replication.reform()
        detail = str(move) + (f": {why}" if move.recomputed and why else "")
        self.d.events.record("rejoined", worker=returning[0] if returning else None,
                             instance=inst.index, detail=detail)
