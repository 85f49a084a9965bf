"""Recovery's state machine in-process: the real Recovery, Replication,
WorkerTable, pipeline instances and block pools, driven as the controller
drives them, with the controller's outward actions (messages, processes)
recorded instead of sent. Time is a clock of the test's own."""
from __future__ import annotations

import itertools

from kevlarflow.deploy.config import DeploymentConfig
from kevlarflow.deploy.instance import MicroBatch, PipelineInstance
from kevlarflow.deploy.workers import WorkerState, WorkerTable
from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.scheduler import ScheduledBatch
from kevlarflow.engine.sequence import Sequence
from kevlarflow.ft.events import EventLog
from kevlarflow.ft.phases import Phase
from kevlarflow.ft.recovery import Recovery
from kevlarflow.replication.controller import Replication

BLOCK = 4


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Deployment:
    """What the controller is to recovery, with its actions recorded."""

    def __init__(self, num_instances=2, pp_size=2, recovery="kevlarflow", replica_blocks=32,
                 replacement_delay_s=0.0, outage_timeout_s=30.0):
        self.config = DeploymentConfig(num_instances=num_instances, pp_size=pp_size,
                                       recovery=recovery, block_size=BLOCK, hang_timeout_s=1.0,
                                       comm_deadline_s=5.0, replication_interval_s=0.0,
                                       replacement_delay_s=replacement_delay_s,
                                       outage_timeout_s=outage_timeout_s)
        self.workers = WorkerTable(num_instances, pp_size)
        self.events = EventLog()
        self.sent, self.called_off, self.spawned, self.failed = [], [], [], []
        self._generations = itertools.count()
        self.pools: dict[str, BlockManager] = {}
        replicas = [replica_blocks if recovery == "kevlarflow" else 0] * pp_size
        self.replication = Replication(self.workers, self.pools, replicas, BLOCK, [64] * pp_size,
                                       self._send, self._call_off, lambda: next(self._generations))
        for name in self.workers.names():
            self.pools[name] = self._pool(name)
        # One micro-batch in flight, so that d.step() advances every request.
        self.instances = [PipelineInstance(i, [f"w{i}.{s}" for s in range(pp_size)],
                                           [self.pools[f"w{i}.{s}"] for s in range(pp_size)],
                                           64, 16, 1, on_free=self.replication.forget)
                          for i in range(num_instances)]
        self.clock = Clock()
        self.recovery = Recovery(self, self.clock)
        self.requests = itertools.count()

    def _pool(self, name):
        pool = BlockManager(64 + self.replication.replica_blocks[self.workers[name].stage], BLOCK,
                            pool=name)
        self.replication.new_pool(name, pool)
        return pool

    def _send(self, to, type_, /, **fields):
        self.sent.append((to, type_, fields))

    def _call_off(self, group, generation, members, reason):
        self.called_off.append((group, generation))

    # The view recovery acts on.
    def build(self, inst, route):
        inst.generation = next(self._generations)
        self.sent += [(w, "build_group", dict(group=inst.group, generation=inst.generation))
                      for w in route]

    def abort_generation(self, inst, reason):
        if inst.generation >= 0:
            self.called_off.append((inst.group, inst.generation))
            inst.generation = -1

    def fail_requests(self, inst, reason):
        for seq in list(inst.sequences):
            seq.finish_reason = "error"
            self.failed.append(seq.request_id)
            inst.sequences.discard(seq)
            inst.scheduler.drop(seq)
            inst.blocks.free_sequence(seq)

    def discard(self, name):
        self.workers.vacate(self.workers[name])

    def spawn(self, name):
        self.workers[name].enter(WorkerState.STARTING)
        self.spawned.append(name)
        return True

    # What the controller does on workers' messages.
    def ready(self, name):
        record = self.workers[name]
        self.workers.register(record, name.encode(), 1, "host")
        record.enter(WorkerState.READY)
        self.pools[name] = self._pool(name)
        self.recovery.worker_ready(name)

    def lose(self, name, reason="process exited"):
        self.recovery.worker_lost(name, reason)

    def connect(self, inst):
        generation = inst.generation
        for w in inst.workers:
            self.recovery.group_ready(inst, generation, w)

    def links_up(self):
        for link in self.replication.links.values():
            for w in (link.source, link.backup):
                self.replication.group_ready(w, link.group, link.generation)

    def start(self):
        """Every worker ready, every instance serving, every link up."""
        for name in self.workers.names():
            self.ready(name)
        for inst in self.instances:
            self.connect(inst)
        self.links_up()
        assert all(self.phase(i) is Phase.SERVING for i in range(len(self.instances)))

    def phase(self, i):
        return self.recovery.phase(self.instances[i])

    def add(self, i, prompt_len=6):
        seq = Sequence(str(next(self.requests)), None, list(range(1, prompt_len + 1)),
                       SamplingParams(max_tokens=50, ignore_eos=True))
        self.instances[i].add(seq)
        return seq

    def step(self, i, ack=True):
        """One micro-batch of instance i, dispatched and returned, its KV
        acknowledged by every backup (or not)."""
        self.complete(i, self.dispatch(i), ack)

    def dispatch(self, i):
        inst = self.instances[i]
        batch = inst.schedule(admit=not self.recovery.awaits_first_step(inst))  # as the controller
        step = next(self.requests)
        for w in inst.workers:
            self.replication.pairs(w, batch.items, step)
        inst.in_flight[step] = MicroBatch(step, batch, [])
        inst.busy.update(seq for seq, _ in batch.items)
        return step

    def complete(self, i, step, ack=True):
        inst = self.instances[i]
        for seq, n in inst.in_flight.pop(step).batch.items:
            inst.busy.discard(seq)
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(7)
        if ack:
            for link in self.replication.links.values():
                self.replication.acknowledged(dict(group=link.group, generation=link.generation,
                                                   worker=link.backup, steps=[step]))
        self.recovery.step_completed(inst)

    def hold_step(self, i):
        """A micro-batch of instance i in flight that has not come back."""
        self.instances[i].in_flight[next(self.requests)] = MicroBatch(0, ScheduledBatch(), [])

    def kinds(self):
        return [e.kind for e in self.events.events]
