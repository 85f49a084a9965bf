"""The discrete-event engine: N pipeline instances of P stages serve a trace,
one worker fails, and each recovery mode does what the real engine does.

An instance is simulated in rounds. In one round, each of its running
sequences takes part in one micro-batch (a decode token, or the next chunk
of its prefill) and each micro-batch makes one trip through the P stages.
The scheduler splits the round's tokens into m = min(P, sequences)
micro-batches of equal size; a stage spends `stage_step_s` on each, so a
round lasts P stage steps whatever m is (m < P: the pipeline is not full;
m = P: every stage is busy all round). A worker lent to a failed instance
runs both pipelines' micro-batches, merged into one step where both are
there, and the two instances' rounds are then as long as the busier of
their own round and that shared work.

Decode sequences advance lazily: a sequence that decodes from round r0 has
emitted (R - r0) more tokens at round R, and a heap holds the round at which
each one finishes, so a round costs time in the number of sequences that
change, not in the number that run; and rounds where nothing but decoding
happens are taken k at a time up to the next event that could change them."""
from __future__ import annotations

import heapq
import math
from collections import deque

from kevlarflow.bench.sim.costs import Costs
from kevlarflow.bench.sim.recovery import FIRST_STEP_PRIORITY_S, RecoveryMixin
from kevlarflow.bench.sim.state import (DECODE, DONE, FAULTS, INF, MODES, PREFILL,
                                        Failure, InstanceState, Round, Seq, TraceRequest)

__all__ = ["FAULTS", "MODES", "Failure", "Simulation", "TraceRequest", "simulate"]


class Simulation(RecoveryMixin):
    def __init__(self, costs: Costs, trace: list[TraceRequest], mode: str,
                 failures: list[Failure] = ()):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        for f in failures:
            if not (0 <= f.instance < costs.instances and 0 <= f.stage < costs.stages):
                raise ValueError(f"failure at instance {f.instance}, stage {f.stage}: no such worker "
                                 f"in {costs.instances} x {costs.stages}")
            if f.kind not in FAULTS:
                raise ValueError(f"failure kind must be one of {FAULTS}, got {f.kind!r}")
            if not f.at_s >= 0:
                raise ValueError(f"failure time must be >= 0, got {f.at_s}")
        if failures and mode != "restart" and costs.instances < 2:
            raise ValueError(f"{mode} recovery borrows a worker of another instance: "
                             "it needs at least 2 instances")
        self.c, self.mode = costs, mode
        self.replicated = mode == "kevlarflow"
        self.seqs = [Seq(i, r) for i, r in enumerate(sorted(trace, key=lambda r: r.arrival_s))]
        for s in self.seqs:
            if s.prompt < 1 or s.output < 1:
                raise ValueError(f"request {s.idx}: prompt and output need at least 1 token each")
        self.instances = [InstanceState(i) for i in range(costs.instances)]
        self.failures = sorted(failures, key=lambda f: f.at_s)
        self.events: list = []       # heap of (time, order, kind, payload)
        self.order = 0
        self.next_arrival = 0
        self.unrouted: deque[Seq] = deque()
        self.log: list[dict] = []    # what happened, as the real benchmark's events
        self.mttr_s: list[float] = []
        self.tokens_recomputed = 0
        self.now = 0.0

    # The event loop -------------------------------------------------------------------

    def _push(self, t: float, kind: str, payload) -> None:
        self.order += 1
        heapq.heappush(self.events, (t, self.order, kind, payload))

    def _next_external(self) -> float:
        """The earliest arrival or control event: rounds are not batched past it."""
        t = self.seqs[self.next_arrival].arrival if self.next_arrival < len(self.seqs) else INF
        for when, _, kind, _ in self.events:  # rounds and controls; few at a time
            if kind != "round" and when < t:
                t = when
        return t

    def run(self) -> "Simulation":
        for f in self.failures:
            self._push(f.at_s, "fail", f)
        while True:
            t_arrival = self.seqs[self.next_arrival].arrival \
                if self.next_arrival < len(self.seqs) else INF
            t_event = self.events[0][0] if self.events else INF
            if t_arrival == INF and t_event == INF:
                break
            if t_event <= t_arrival:
                t, _, kind, payload = heapq.heappop(self.events)
                self.now = t
                getattr(self, "_on_" + kind)(t, payload)
            else:
                self.now = t_arrival
                seq = self.seqs[self.next_arrival]
                self.next_arrival += 1
                self._route(seq, t_arrival)
        return self

    # Routing ----------------------------------------------------------------------------

    def _route(self, seq: Seq, t: float) -> None:
        serving = [inst for inst in self.instances if inst.routable]
        if not serving:
            self.unrouted.append(seq)
            return
        inst = min(serving, key=lambda i: (i.outstanding(), i.index))
        inst.waiting.append(seq)
        inst.other_outstanding += seq.outstanding()
        self._start_round(inst, t)

    def _set_routable(self, inst: InstanceState, t: float) -> None:
        inst.routable = True
        while self.unrouted:
            self._route(self.unrouted.popleft(), t)

    # Rounds -----------------------------------------------------------------------------

    def _start_round(self, inst: InstanceState, t: float) -> None:
        if not inst.up or inst.round is not None or self._yields(inst, t):
            return
        c = self.c
        budget_per_mb = c.max_num_batched_tokens
        decode = len(inst.decoding)
        # Decoders beyond the budget are not left out here but make the round
        # longer: the same throughput as the real scheduler's rotation.
        budget = c.stages * budget_per_mb - decode
        chunks = []
        for seq in inst.prefilling:
            if budget <= 0:
                break
            n = min(seq.pending, budget_per_mb, budget)
            chunks.append((seq, n))
            budget -= n
        while inst.waiting and budget > 0 and \
                decode + len(inst.prefilling) < c.max_num_seqs:
            seq = inst.waiting.popleft()
            seq.state = PREFILL
            inst.prefilling.append(seq)
            n = min(seq.pending, budget_per_mb, budget)
            chunks.append((seq, n))
            budget -= n
        sequences = decode + len(chunks)
        if sequences == 0:
            inst.load = (0, 0.0, 0.0)
            return
        prefill = sum(n for _, n in chunks)
        m = min(c.stages, sequences)
        step = c.stage_step_s(prefill / m, decode / m)
        length = c.stages * step
        partner = self.instances[inst.partner] if inst.partner is not None else None
        # The first step after a reroute runs alone at the lent worker: the
        # lender starts no step of its own until it is back (`_yields`).
        first = partner is not None and inst.failed_at is not None
        lent = 0.0
        if partner is not None:
            pm, pp, pd = (0, 0.0, 0.0) if first else partner.load
            merged = max(m, pm)
            lent = merged * c.stage_step_s((prefill + pp) / merged, (decode + pd) / merged)
            if not (c.cpu_cores and c.pinned_instances):
                length = max(length, lent)
        first_s = None  # when the round's first micro-batch is back, if before its end
        if c.cpu_cores and c.pinned_instances:
            cores = c.cpu_cores / c.instances
            if partner is None:
                # The instance's workers share its own cores, whatever the
                # others do: m micro-batches a round, P stage steps each.
                length *= max(1.0, m / cores)
                # The first micro-batch is back before the others: its trip
                # shares the cores with their first m - 1 steps at most.
                first_s = c.stages * step * min(max(1.0, m / cores), (c.stages + m - 1) / c.stages)
            else:
                # A lent worker runs on its lender's cores, beside the
                # lender's other P - 1 stages: per round those cores do the
                # lender's own steps there plus the lent stage's merged ones,
                # and both instances' rounds wait for that work; the
                # borrower's other stages are on its own cores.
                lender_m, lender_p, lender_d = (m, prefill, decode) if partner.recovering \
                    else (0, 0.0, 0.0) if first else partner.load
                lender_own = (c.stages - 1) * lender_m * c.stage_step_s(
                    lender_p / lender_m, lender_d / lender_m) if lender_m else 0.0
                trip = (c.stages - 1) * step + lent / max(m, 0 if first else partner.load[0])
                length = max(trip, (c.stages - 1) * m * step / cores,
                             (lender_own + lent) / cores)
                # Its first micro-batch is back after one trip through the
                # stages (what the engine's MTTR waits for), the others after it.
                first_s = trip
        elif c.cpu_cores:
            # Each micro-batch in flight keeps one worker busy; beyond the
            # cores, the workers share them.
            busy = m + sum(o.load[0] for o in self.instances if o is not inst and o.up)
            length *= max(1.0, busy / c.cpu_cores)
        inst.load = (m, float(prefill), float(decode))
        inst.last_round_s = length
        count = 1
        if not chunks and inst.partner is None:
            # Only decoding until a sequence finishes or something comes in.
            until_finish = self._next_finish(inst) - inst.R
            gap = self._next_external() - t
            until_event = math.floor(gap / length) if gap < INF else until_finish
            count = max(1, min(until_finish, until_event))
        inst.round_ids += 1
        inst.round = Round(t, length, count, chunks, inst.round_ids,
                           first_s if first_s is not None else length)
        self._push(t + count * length, "round", (inst.index, inst.round_ids))

    def _yields(self, inst: InstanceState, t: float) -> bool:
        """inst lends a worker to an instance that resumed and has not yet
        completed a step: as the real controller (ft/recovery.py `yields`),
        it starts no round of its own meanwhile, for at most
        FIRST_STEP_PRIORITY_S."""
        if inst.partner is None:
            return False
        other = self.instances[inst.partner]
        return other.recovering and other.failed_at is not None and other.up \
            and t - other.resumed_at < FIRST_STEP_PRIORITY_S \
            and (other.round is not None or bool(other.waiting) or bool(other.prefilling)
                 or bool(other.decoding))

    def _next_finish(self, inst: InstanceState) -> int:
        heap = inst.finish_heap
        while heap and (heap[0][3].state != DECODE or heap[0][3].epoch != heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else 1 << 62

    def _on_round(self, t: float, payload) -> None:
        inst = self.instances[payload[0]]
        if inst.round is None or inst.round.id != payload[1]:
            return  # abandoned
        self._commit(inst, inst.round, inst.round.count)
        inst.round = None
        self._start_round(inst, t)
        if inst.partner is not None:  # a lender held back for this round starts again
            self._start_round(self.instances[inst.partner], t)

    def _commit(self, inst: InstanceState, rnd: Round, count: int) -> None:
        """Apply `count` rounds of rnd (the chunks belong to its only round)."""
        if count <= 0:
            return
        first_end = rnd.start + rnd.first_s
        if inst.failed_at is not None:
            self.mttr_s.append(first_end - inst.failed_at)
            self._record("first_step_after_failure", first_end, inst.index)
            inst.failed_at = None
        r0 = inst.R
        inst.R += count
        heap = inst.finish_heap
        while heap and heap[0][0] <= inst.R:
            finish_round, _, epoch, seq = heapq.heappop(heap)
            if seq.state == DECODE and seq.epoch == epoch:
                self._leave_decode(inst, seq)
                seq.last = rnd.start + (finish_round - r0) * rnd.length
                seq.state = DONE
        end = rnd.start + count * rnd.length
        for seq, n in rnd.chunks:
            if seq.state != PREFILL:
                continue
            inst.other_outstanding -= seq.outstanding()
            seq.pending -= n
            seq.chunk = n
            if seq.pending > 0:
                inst.other_outstanding += seq.outstanding()
                continue
            seq.emitted += 1  # the last chunk of a prefill samples a token
            seq.pending = 1
            if seq.first is None:
                seq.first = end
            seq.last = end
            inst.prefilling.remove(seq)
            if seq.emitted >= seq.output:
                seq.state = DONE
            else:
                self._enter_decode(inst, seq)

    def _enter_decode(self, inst: InstanceState, seq: Seq) -> None:
        seq.state, seq.r_join, seq.chunk = DECODE, inst.R, 1
        inst.decoding.add(seq)
        inst.decode_base += seq.output - seq.emitted + seq.r_join
        heapq.heappush(inst.finish_heap,
                       (seq.r_join + seq.output - seq.emitted, seq.idx, seq.epoch, seq))

    def _leave_decode(self, inst: InstanceState, seq: Seq) -> None:
        inst.decode_base -= seq.output - seq.emitted + seq.r_join
        seq.emitted += inst.R - seq.r_join
        seq.epoch += 1
        inst.decoding.discard(seq)

    def _abandon_round(self, inst: InstanceState, t: float) -> None:
        """Micro-batches in flight are lost; whole rounds of a batch of decode
        rounds that ended before t were delivered."""
        rnd = inst.round
        if rnd is None:
            return
        if rnd.count > 1:
            self._commit(inst, rnd, min(rnd.count, math.floor((t - rnd.start) / rnd.length)))
        inst.round = None

    # Results -----------------------------------------------------------------------------

    def requests(self) -> list[dict]:
        """Per request: arrival, first and last token times (None if it never
        finished), and output tokens."""
        return [dict(arrival_s=s.arrival, first_s=s.first if s.state == DONE else None,
                     last_s=s.last if s.state == DONE else None, tokens=s.output)
                for s in self.seqs]


def simulate(costs: Costs, trace: list[TraceRequest], mode: str,
             failures: list[Failure] = ()) -> Simulation:
    return Simulation(costs, trace, mode, list(failures)).run()
