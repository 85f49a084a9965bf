"""What the simulated controller does when a worker fails: detection, then
KevlarFlow's reroute through a lent worker, the replacement and the move
back; or the restart baseline's whole-instance restart. Mixed into
Simulation (model.py), whose event loop calls the _on_<event> methods."""
from __future__ import annotations

import math

from kevlarflow.bench.sim.state import DECODE, INF, PREFILL, WAITING, Failure, InstanceState

FIRST_STEP_PRIORITY_S = 0.5  # ft/recovery.py: the longest a lender holds its steps back for a first step


class RecoveryMixin:
    def _record(self, kind: str, t: float, instance: int, stage: int | None = None,
                detail: str = "", **figures) -> None:
        worker = f"w{instance}.{stage}" if stage is not None else None
        self.log.append(dict(kind=kind, t_s=t, instance=instance, worker=worker, detail=detail,
                             **figures))

    def _on_fail(self, t: float, f: Failure) -> None:
        inst = self.instances[f.instance]
        if inst.recovering or inst.partner is not None:
            raise ValueError(f"failure at {f.at_s} s hits instance {f.instance} while it recovers "
                             "from or helps with another failure: not modelled")
        inst.recovering = True
        self._abandon_round(inst, t)
        inst.up = False
        inst.failed_at = t
        self._record("failed", t, f.instance, f.stage, f.kind)
        delay = self.c.detect_kill_s if f.kind == "kill" else self.c.detect_hang_s
        self._push(t + delay, "detect", f)

    def _on_detect(self, t: float, f: Failure) -> None:
        inst = self.instances[f.instance]
        inst.routable = False
        self._record("detected", t, f.instance, f.stage, f.kind)
        self._record("replacement_started", t, f.instance, f.stage)
        if self.mode == "restart":
            # The whole instance is replaced: every worker loads in parallel.
            self._preempt_all(inst, t)
            load = self.c.stage_load_s()
            if self.c.cpu_cores and self.c.pinned_instances:
                # The P new processes start, import and load on the instance's
                # own cores, all at once: CPU-bound, they share them.
                load *= max(1.0, self.c.stages / (self.c.cpu_cores / self.c.instances))
            self._push(t + self.c.replacement_delay_s + load, "restart_loaded", f)
            return
        # The next healthy instance in the ring, not already lending a worker.
        ring = [self.instances[(f.instance + k) % self.c.instances]
                for k in range(1, self.c.instances)]
        donor = next((d for d in ring if d.up and d.partner is None), None)
        if donor is None:
            raise ValueError(f"no healthy instance to lend instance {f.instance} a stage-{f.stage} worker")
        self._rewind(inst, self.replicated, t, "failure")
        self._push(t + self.c.comm_build_s, "resume", (f, donor.index))
        self._push(t + self.c.replacement_delay_s + self.c.stage_load_s(), "replacement_loaded", f)

    def _on_resume(self, t: float, payload) -> None:
        f, donor = payload
        inst = self.instances[f.instance]
        inst.partner, self.instances[donor].partner = donor, f.instance
        inst.up = True
        inst.resumed_at = t
        # The lender holds its rounds for the first step (model.py `_yields`), at most this long.
        self._push(t + FIRST_STEP_PRIORITY_S, "priority_end", donor)
        self._record("resumed", t, f.instance, f.stage, f"borrows w{donor}.{f.stage}")
        self._set_routable(inst, t)
        self._start_round(inst, t)

    def _on_priority_end(self, t: float, donor: int) -> None:
        self._start_round(self.instances[donor], t)

    def _on_replacement_loaded(self, t: float, f: Failure) -> None:
        inst = self.instances[f.instance]
        self._record("replacement_loaded", t, f.instance, f.stage)
        wait = 0.0
        if self._keeps_kv_on_rejoin():
            # The real engine moves back once the replacement holds a replica
            # of every running request (one replication round), or after the
            # hang timeout.
            tokens = sum(s.computed() for s in inst.running())
            transfer = tokens * self.c.kv_bytes_per_token_per_stage / self.c.link_bytes_per_s
            wait = min(self.c.replication_interval_s + transfer, self.c.detect_hang_s)
        self._push(t + wait, "rejoin", f)

    def _keeps_kv_on_rejoin(self) -> bool:
        # Only with two instances is the replacement the backup of the worker
        # the instance borrowed (a ring of two); otherwise its requests recompute.
        return self.replicated and self.c.instances == 2

    def _on_rejoin(self, t: float, f: Failure) -> None:
        inst = self.instances[f.instance]
        if inst.partner is None:  # the replacement beat the rebuild onto the lent worker
            self._push(t + self.c.comm_build_s, "rejoin", f)
            return
        self._abandon_round(inst, t)
        inst.up, inst.routable = False, False
        donor = self.instances[inst.partner]
        inst.partner = donor.partner = None
        self._rewind(inst, self._keeps_kv_on_rejoin(), t, "rejoin")
        self._record("rejoined", t, f.instance, f.stage)
        self._push(t + self.c.comm_build_s, "home", f)

    def _on_home(self, t: float, f: Failure) -> None:
        inst = self.instances[f.instance]
        inst.up, inst.recovering = True, False
        self._set_routable(inst, t)
        self._start_round(inst, t)
        for other in self.instances:  # the lender's rounds are its own again
            self._start_round(other, t)

    def _on_restart_loaded(self, t: float, f: Failure) -> None:
        self._record("replacement_loaded", t, f.instance, f.stage)
        self._push(t + self.c.comm_build_s, "restart_ready", f)

    def _on_restart_ready(self, t: float, f: Failure) -> None:
        inst = self.instances[f.instance]
        inst.up, inst.recovering = True, False
        self._record("resumed", t, f.instance, f.stage)
        self._set_routable(inst, t)
        self._start_round(inst, t)

    def _lag_rounds(self, inst: InstanceState) -> float:
        """How many rounds a replica trails its source: on average half an
        interval plus the time to send an interval's KV; replication that
        cannot keep up with the link keeps nothing."""
        c = self.c
        if inst.last_round_s <= 0:
            return INF
        _, prefill, decode = inst.load
        tokens_per_s = (prefill + decode) / inst.last_round_s
        transfer = tokens_per_s * c.replication_interval_s * c.kv_bytes_per_token_per_stage \
            / c.link_bytes_per_s
        if transfer >= c.replication_interval_s:
            return INF
        return math.ceil((c.replication_interval_s / 2 + transfer) / inst.last_round_s)

    def _rewind(self, inst: InstanceState, replicated: bool, t: float, why: str) -> None:
        """Running sequences lose the KV past their replica (all of it
        without one) and recompute it as a chunked prefill."""
        lag = self._lag_rounds(inst) if replicated else INF
        running = inst.running()
        held = lost_total = 0
        for seq in running:
            if seq.state == DECODE:
                self._leave_decode(inst, seq)
            else:
                inst.other_outstanding -= seq.outstanding()
            lost = seq.computed() if lag == INF else min(seq.computed(), lag * seq.chunk)
            held += seq.computed()
            lost_total += lost
            seq.pending += lost
            self.tokens_recomputed += lost
            seq.state = PREFILL
            inst.other_outstanding += seq.outstanding()
        inst.prefilling = sorted(running, key=lambda s: s.arrival)
        self._record("recompute", t, inst.index, detail=f"{why}: {len(running)} requests recompute "
                     f"{lost_total} of their {held} tokens of KV", tokens=lost_total, of=held)

    def _preempt_all(self, inst: InstanceState, t: float) -> None:
        """restart: every running request goes back to the front of the
        waiting queue (oldest first) and starts over."""
        self._rewind(inst, False, t, "restart")
        for seq in reversed(inst.prefilling):
            seq.state = WAITING
            inst.waiting.appendleft(seq)
        inst.prefilling = []
