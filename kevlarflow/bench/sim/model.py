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
from dataclasses import dataclass

from kevlarflow.bench.sim.costs import Costs

MODES = ("kevlarflow", "kevlarflow-no-replication", "restart")
FAULTS = ("kill", "hang")

WAITING, PREFILL, DECODE, DONE = range(4)
INF = float("inf")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Failure:
    at_s: float
    instance: int
    stage: int
    kind: str = "kill"


class _Seq:
    __slots__ = ("idx", "arrival", "prompt", "output", "pending", "emitted", "first", "last",
                 "state", "r_join", "epoch", "chunk")

    def __init__(self, idx: int, req: TraceRequest):
        self.idx, self.arrival = idx, req.arrival_s
        self.prompt, self.output = req.prompt_tokens, req.output_tokens
        self.pending = self.prompt  # tokens to compute before the next output token
        self.emitted = 0            # output tokens (for DECODE: as of r_join)
        self.first = self.last = None
        self.state = WAITING
        self.r_join = 0
        self.epoch = 0              # bumped when it leaves DECODE: stale heap entries
        self.chunk = 0              # tokens it took in its last round

    def computed(self) -> int:
        return self.prompt + self.emitted - self.pending

    def outstanding(self) -> int:
        """What the router counts: prompt not yet computed plus output to come."""
        return max(0, self.pending - self.emitted) + self.output - self.emitted


class _Round:
    __slots__ = ("start", "length", "count", "chunks", "id")

    def __init__(self, start, length, count, chunks, rid):
        self.start, self.length, self.count, self.chunks, self.id = start, length, count, chunks, rid


class _Instance:
    def __init__(self, index: int):
        self.index = index
        self.waiting: deque[_Seq] = deque()
        self.prefilling: list[_Seq] = []
        self.decoding: set[_Seq] = set()
        self.finish_heap: list = []
        self.R = 0                  # rounds completed
        self.decode_base = 0        # sum over decoding of (output - emitted + r_join)
        self.other_outstanding = 0  # outstanding tokens of waiting and prefilling ones
        self.up = True              # can run rounds
        self.routable = True        # the router may send it requests
        self.round: _Round | None = None
        self.round_ids = 0
        self.partner: int | None = None  # the instance it shares a worker with
        self.load = (0, 0.0, 0.0)   # its last round: micro-batches, prefill, decode tokens
        self.last_round_s = 0.0
        self.failed_at: float | None = None
        self.recovering = False

    def outstanding(self) -> int:
        return self.other_outstanding + self.decode_base - len(self.decoding) * self.R

    def running(self) -> list[_Seq]:
        return self.prefilling + list(self.decoding)


class Simulation:
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
        self.seqs = [_Seq(i, r) for i, r in enumerate(sorted(trace, key=lambda r: r.arrival_s))]
        for s in self.seqs:
            if s.prompt < 1 or s.output < 1:
                raise ValueError(f"request {s.idx}: prompt and output need at least 1 token each")
        self.instances = [_Instance(i) for i in range(costs.instances)]
        self.failures = sorted(failures, key=lambda f: f.at_s)
        self.events: list = []       # heap of (time, order, kind, payload)
        self.order = 0
        self.next_arrival = 0
        self.unrouted: deque[_Seq] = deque()
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

    def _route(self, seq: _Seq, t: float) -> None:
        serving = [inst for inst in self.instances if inst.routable]
        if not serving:
            self.unrouted.append(seq)
            return
        inst = min(serving, key=lambda i: (i.outstanding(), i.index))
        inst.waiting.append(seq)
        inst.other_outstanding += seq.outstanding()
        self._start_round(inst, t)

    def _set_routable(self, inst: _Instance, t: float) -> None:
        inst.routable = True
        while self.unrouted:
            self._route(self.unrouted.popleft(), t)

    # Rounds -----------------------------------------------------------------------------

    def _start_round(self, inst: _Instance, t: float) -> None:
        if not inst.up or inst.round is not None:
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
        length = c.stages * c.stage_step_s(prefill / m, decode / m)
        if inst.partner is not None:
            pm, pp, pd = self.instances[inst.partner].load
            merged = max(m, pm)
            length = max(length, merged * c.stage_step_s((prefill + pp) / merged,
                                                          (decode + pd) / merged))
        if c.cpu_cores:
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
        inst.round = _Round(t, length, count, chunks, inst.round_ids)
        self._push(t + count * length, "round", (inst.index, inst.round_ids))

    def _next_finish(self, inst: _Instance) -> int:
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

    def _commit(self, inst: _Instance, rnd: _Round, count: int) -> None:
        """Apply `count` rounds of rnd (the chunks belong to its only round)."""
        if count <= 0:
            return
        first_end = rnd.start + rnd.length
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

    def _enter_decode(self, inst: _Instance, seq: _Seq) -> None:
        seq.state, seq.r_join, seq.chunk = DECODE, inst.R, 1
        inst.decoding.add(seq)
        inst.decode_base += seq.output - seq.emitted + seq.r_join
        heapq.heappush(inst.finish_heap,
                       (seq.r_join + seq.output - seq.emitted, seq.idx, seq.epoch, seq))

    def _leave_decode(self, inst: _Instance, seq: _Seq) -> None:
        inst.decode_base -= seq.output - seq.emitted + seq.r_join
        seq.emitted += inst.R - seq.r_join
        seq.epoch += 1
        inst.decoding.discard(seq)

    def _abandon_round(self, inst: _Instance, t: float) -> None:
        """Micro-batches in flight are lost; whole rounds of a batch of decode
        rounds that ended before t were delivered."""
        rnd = inst.round
        if rnd is None:
            return
        if rnd.count > 1:
            self._commit(inst, rnd, min(rnd.count, math.floor((t - rnd.start) / rnd.length)))
        inst.round = None

    # Failure and recovery ----------------------------------------------------------------

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
            self._push(t + self.c.stage_load_s(), "restart_loaded", f)
            return
        donor = next((self.instances[(f.instance + k) % self.c.instances]
                      for k in range(1, self.c.instances)
                      if self.instances[(f.instance + k) % self.c.instances].up
                      and self.instances[(f.instance + k) % self.c.instances].partner is None),
                     None)
        if donor is None:
            raise ValueError(f"no healthy instance to lend instance {f.instance} a stage-{f.stage} worker")
        self._rewind(inst, self.replicated, t, "failure")
        self._push(t + self.c.comm_build_s, "resume", (f, donor.index))
        self._push(t + self.c.stage_load_s(), "replacement_loaded", f)

    def _on_resume(self, t: float, payload) -> None:
        f, donor = payload
        inst = self.instances[f.instance]
        inst.partner, self.instances[donor].partner = donor, f.instance
        inst.up = True
        self._record("resumed", t, f.instance, f.stage, f"borrows w{donor}.{f.stage}")
        self._set_routable(inst, t)
        self._start_round(inst, t)

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
        donor_rounds = [i for i in self.instances if i.round is None]
        for other in donor_rounds:
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

    def _lag_rounds(self, inst: _Instance) -> float:
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

    def _rewind(self, inst: _Instance, replicated: bool, t: float, why: str) -> None:
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

    def _preempt_all(self, inst: _Instance, t: float) -> None:
        """restart: every running request goes back to the front of the
        waiting queue (oldest first) and starts over."""
        self._rewind(inst, False, t, "restart")
        for seq in reversed(inst.prefilling):
            seq.state = WAITING
            inst.waiting.appendleft(seq)
        inst.prefilling = []

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
