"""What the controller does when a worker fails, and when one joins.

KevlarFlow's recovery (recovery="kevlarflow"): the failed worker's
communicators are aborted on every survivor (through their heartbeat
sockets, so a survivor blocked in an op of that group wakes at once); each
instance that ran on the failed worker borrows the same-stage worker of a
healthy instance (its backup in the replication ring, when it has one), which
then serves both pipelines from one KV pool under the controller's
accounting; only the affected instance's communicator is rebuilt; survivors
keep their weights and their KV (nothing is reloaded). The affected requests
keep every token they produced. At the failed stage, the borrowed worker's
replicas of the failed worker become live blocks, and each request recomputes
only the tokens past its replication watermark (without replicas: all of
them), as a chunked prefill through the pipeline; that gives the same tokens.

A replacement for the failed worker starts at once, loads its stage in the
background and joins. The instance moves back to its own workers once the
borrowed worker's replicas of its requests on the replacement have caught up
(the ring makes the replacement that worker's backup): the move is a
takeover like the one after a failure, so requests in flight keep running
and recompute at most their replication lag. Without such a link (no
replication, or a ring of three or more), they recompute at the move.

The baseline (recovery="restart") is today's stacks: the whole instance goes
down, every one of its workers is replaced (new processes, weights loaded from
disk, communicators made again) and its requests wait and recompute from
scratch; the router sends new requests to live instances meanwhile."""
from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("kevlarflow.ft")

MAX_REPLACEMENT_ATTEMPTS = 3  # for one failure: a slot whose processes keep dying is given up


class RecoveryMixin:
    """Mixed into DistributedEngine; uses its workers, instances and endpoint."""

    # Failure -------------------------------------------------------------------------

    def inject_fault(self, instance: int, stage: int, kind: str = "kill") -> None:
        """Deliver a real fault to the worker at (instance, stage): SIGKILL for
        "kill", SIGSTOP (a hang) for "hang". For tests, benchmarks and demos."""
        signals = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}
        if kind not in signals:
            raise ValueError(f"kind must be 'kill' or 'hang', got {kind!r}")
        if not (0 <= instance < len(self.instances) and 0 <= stage < self.config.pp_size):
            raise ValueError(f"no worker at instance {instance}, stage {stage}")
        name = self.instances[instance].home[stage]
        pid = self.pid_of.get(name)
        if name not in self.ready or pid is None or not self.launcher \
                or (instance, stage) not in self.launcher.procs:
            raise ValueError(f"{name} is not a live worker started by this controller")
        self.events.record("failed", worker=name, instance=instance, detail=kind)
        os.kill(pid, signals[kind])

    def worker_failed(self, name: str, reason: str) -> None:
        if name not in self.peer_of and name not in self.ready:
            return  # already handled
        self.events.record("detected", worker=name, instance=self.slot_of[name][0], detail=reason)
        self._forget_worker(name)
        affected = [inst for inst in self.instances if name in inst.workers]
        if self.config.recovery == "restart":
            for inst in affected:
                self._break_instance(inst, f"{name} failed")
            for inst in affected:
                self._restart_instance(inst)
            return
        for inst in affected:
            self._break_instance(inst, f"{name} failed")
        self._start_replacement(name)
        for inst in affected:
            self._reroute(inst)
        self.replication.reform()

    def _forget_worker(self, name: str) -> None:
        """No message of this process is trusted again; a hung one is killed
        so that it cannot wake up later into a deployment that moved on."""
        peer = self.peer_of.pop(name, None)
        self.worker_of.pop(peer, None)
        self.heartbeat_peer_of.pop(name, None)
        self.ready.discard(name)
        self.health.forget(name)
        slot = self.slot_of[name]
        proc = self.launcher.procs.get(slot) if self.launcher else None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _break_instance(self, inst, reason: str, failure: bool = True) -> None:
        if failure and inst.failed_at is None:
            inst.failed_at = time.time()
        inst.serving = False
        inst.suspect_since = None
        for w in inst.workers:
            peer = self.heartbeat_peer_of.get(w)
            if peer is not None and inst.generation >= 0:
                self.endpoint.send(peer, "abort_group", group=inst.group, generation=inst.generation)
        inst.generation = -1  # steps of the old generation are stale everywhere
        self.rejoining.pop(inst.index, None)
        if self.config.recovery == "restart":
            # Every token that held KV is computed again from scratch.
            self.replication.stats["tokens_recomputed"] += sum(
                seq.num_computed_tokens for seq in inst.running())
            inst.preempt_all()
        else:  # survivors keep their KV: _reroute decides what moves and what recomputes
            inst.abandon_in_flight()
        self.events.record("aborted", instance=inst.index, detail=reason)

    def _start_replacement(self, name: str) -> None:
        if not self.launcher:
            log.warning("%s failed: waiting for a `kevlarflow worker` to take its slot", name)
            return
        i, s = self.slot_of[name]
        attempts = self.replacing.get(name, 0) + 1
        if attempts > MAX_REPLACEMENT_ATTEMPTS:
            log.error("%s: %d replacements died while starting; giving up on its slot", name,
                      attempts - 1)
            return
        self.replacing[name] = attempts
        self.launcher.spawn(i, s)
        self.events.record("replacement_started", worker=name, instance=i,
                           detail=f"attempt {attempts}")

    def _restart_instance(self, inst) -> None:
        """The baseline: every worker of the instance is replaced."""
        for name in inst.home:
            if name in self.peer_of or name in self.ready:
                self._forget_worker(name)
        inst.use_workers(inst.home, [self.pools[w] for w in inst.home])
        for name in inst.home:
            self._start_replacement(name)

    # Rerouting --------------------------------------------------------------------------

    def _reroute(self, inst) -> str:
        """Run inst on live workers, its own where it can, else a healthy
        instance's worker of the same stage; rebuild its communicator."""
        route = []
        for s, own in enumerate(inst.home):
            if own in self.ready:
                route.append(own)
                continue
            backup = self.replication.links.get(inst.workers[s])
            candidates = ([backup.backup] if backup else []) + \
                [o.home[s] for o in self.instances if o is not inst]
            donor = next((w for w in candidates if w in self.ready), None)
            if donor is None:
                inst.serving = False
                self._fail_requests(inst, f"no live worker for stage {s}")
                return "requests failed"
            route.append(donor)
        moved = self._move_kv(inst, route)
        self._build_group(inst)
        if route != inst.home:
            self.events.record("rerouted", instance=inst.index,
                               detail=" -> ".join(route) + f"; {moved}")
        return moved

    def _move_kv(self, inst, route: list[str]) -> str:
        """Switch inst to the workers of route. At a stage whose worker
        changes, the new worker takes over its replicas of the old one; every
        request then recomputes from the fewest tokens any stage kept."""
        seqs = list(inst.scheduler.running)
        kept = {seq: seq.num_computed_tokens for seq in seqs}
        for s, (old, new) in enumerate(zip(inst.workers, route)):
            if old == new:
                continue
            for seq, tokens in self.replication.take_over(old, new, seqs).items():
                kept[seq] = min(kept[seq], tokens)
            for seq in seqs:  # old is dead, or keeps serving other requests only
                self.pools[old].free_sequence(seq)
                self.replication.forget_on(old, seq)
        inst.use_workers(route, [self.pools[w] for w in route])
        stats = self.replication.stats
        restored = recomputed = 0
        for seq in seqs:
            self.replication.moved(seq.request_id, seq.num_computed_tokens, kept[seq])
            recomputed += seq.num_computed_tokens - kept[seq]
            restored += kept[seq]
            stats["requests_restored"] += bool(kept[seq])
            seq.num_computed_tokens = kept[seq]
        stats["tokens_restored"] += restored
        stats["tokens_recomputed"] += recomputed
        return f"{len(seqs)} requests keep {restored} tokens of KV, recompute {recomputed}"

    def _fail_requests(self, inst, reason: str) -> None:
        """The instance's requests end with an error (never a hang)."""
        if inst.sequences:
            self.events.record("requests_failed", instance=inst.index,
                               detail=f"{len(inst.sequences)} requests: {reason}")
        for seq in list(inst.sequences):
            seq.finish_reason = "error"
            self._undelivered.append(self._finish(seq, "", []))

    # Joining -----------------------------------------------------------------------------

    def worker_joined(self, name: str) -> None:
        """A worker finished loading (at start-up, or a replacement)."""
        self.pools[name] = self._new_pool(name)  # a new process: an empty pool
        replacement = name in self.replacing
        if replacement:
            del self.replacing[name]
            self.events.record("replacement_loaded", worker=name, instance=self.slot_of[name][0])
        self.replication.reform()
        for inst in self.instances:
            if name not in inst.home or not self.ready.issuperset(inst.home):
                continue
            if inst.workers == inst.home and inst.generation >= 0:
                continue  # already running on its own workers
            if inst.generation >= 0 and self._migration_links(inst) is not None:
                self.rejoining[inst.index] = (time.monotonic(), name)  # once replicas caught up
                continue
            self._rejoin(inst, name if replacement else None)

    def _rejoin(self, inst, replacement: str | None) -> None:
        """Move inst back to its own workers."""
        if inst.generation >= 0:  # it ran on a borrowed worker until now
            self._break_instance(inst, f"{replacement or 'its own worker'} rejoins", failure=False)
        moved = self._reroute(inst)
        self.replication.reform()
        if replacement:
            self.events.record("rejoined", worker=replacement, instance=inst.index, detail=moved)

    def _migration_links(self, inst) -> list | None:
        """The links from each borrowed worker of inst to inst's own worker of
        that stage; None if some borrowed worker replicates elsewhere."""
        borrowed = [(own, now) for own, now in zip(inst.home, inst.workers) if own != now]
        links = [self.replication.links.get(now) for _, now in borrowed]
        if all(link is not None and link.backup == own for link, (own, _) in zip(links, borrowed)):
            return links
        return None

    def check_rejoins(self) -> None:
        """Instances waiting to move back do so once every running request
        has KV acknowledged at its own workers (then it recomputes only its
        replication lag; waiting longer would not shrink that), or after the
        hang timeout."""
        for index, (since, name) in list(self.rejoining.items()):
            inst = self.instances[index]
            links = self._migration_links(inst)
            caught_up = links is not None and all(link.ready for link in links) and all(
                link.watermark(seq) > 0 for link in links for seq in inst.running())
            if links is None or caught_up or time.monotonic() - since > self.config.hang_timeout_s:
                del self.rejoining[index]
                self._rejoin(inst, name)

    def instance_serving(self, inst) -> None:
        """Its communicator is up again after a failure: it can take steps."""
        if inst.failed_at is not None:
            self.events.record("resumed", instance=inst.index, detail=" -> ".join(inst.workers))

    def step_completed(self, inst) -> None:
        if inst.failed_at is not None:
            self.events.record("first_step_after_failure", instance=inst.index,
                               detail=f"{time.time() - inst.failed_at:.3f} s after the failure")
            inst.failed_at = None

    # Errors reported by workers --------------------------------------------------------------

    def _on_error(self, name: str, m: dict) -> None:
        inst = self.instance_of_step(m["step"])
        if m["step"] is not None and inst is None:
            return  # about a step given up on already
        log.warning("%s: %s: %s", name, m["kind"], m["message"])
        if m["kind"] == "link":  # a replication link did not connect: the pipelines are fine
            self.replication.retry_links(name)
        elif m["kind"] == "comm":
            # Some member of the pipeline is dead or hung, not necessarily the
            # reporter: the health monitor finds which. Until then, pause.
            for inst in self.instances:
                if name in inst.workers and inst.suspect_since is None:
                    inst.suspect_since = time.monotonic()
                    inst.serving = False
        else:  # a step the worker refused: a bug; the requests end, not the process
            inst = inst or self.instances[self.slot_of[name][0]]
            inst.in_flight.clear()
            inst.busy.clear()
            self._fail_requests(inst, f"{name}: {m['message']}")

    def check_suspects(self) -> None:
        """A communicator error that no failure explains within the hang
        timeout (twice over) was transient: rebuild with the same workers."""
        for inst in self.instances:
            if inst.suspect_since is not None and \
                    time.monotonic() - inst.suspect_since > 2 * self.config.hang_timeout_s:
                self._break_instance(inst, "communicator error without a failed worker")
                self._reroute(inst)
