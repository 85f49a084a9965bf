"""The controller of a deployment: num_instances pipeline instances of pp_size
stage workers each, behind one request API (the same as LLMEngine's).

The controller hosts the rendezvous store (torch.distributed's TCPStore) and
the control socket, starts the workers (or waits for external ones to
register), assigns each a slot, and once every worker of an instance has
loaded its stage, asks them to build the instance's communicator. Then step()
keeps each instance's pipeline full of micro-batches and turns the tokens
that come back into outputs. What happens when workers fail is decided by
ft.recovery, which acts on the deployment through the methods under
"Recovery's view" below."""
from __future__ import annotations

import itertools
import json
import logging
import os
import time

from kevlarflow.comm.backend_choice import Placement, choose_backend
from kevlarflow.comm.manager import abandon_generation
from kevlarflow.deploy.config import DeploymentConfig, StagePools
from kevlarflow.deploy.control import ControllerEndpoint
from kevlarflow.deploy.devices import sharing_note
from kevlarflow.deploy.join import TOKEN_ENV, JoinKeys, new_token
from kevlarflow.deploy.instance import MicroBatch, PipelineInstance
from kevlarflow.deploy.launcher import LocalLauncher
from kevlarflow.deploy.membership import Membership
from kevlarflow.deploy.router import pick_instance
from kevlarflow.deploy.store import HostedStore
from kevlarflow.deploy.status import DeploymentStatus, snapshot
from kevlarflow.deploy.workers import WorkerTable
from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.frontend import RequestFrontend
from kevlarflow.engine.outputs import RequestOutput
from kevlarflow.engine.sequence import Sequence
from kevlarflow.ft.events import EventLog
from kevlarflow.ft.health import HealthMonitor
from kevlarflow.ft.recovery import Recovery
from kevlarflow.model import fingerprint
from kevlarflow.model.config import DTYPES, ModelConfig
from kevlarflow.replication.controller import Replication

log = logging.getLogger("kevlarflow.controller")

__all__ = ["DeploymentConfig", "DeploymentError", "Controller"]


def _model_config(model: str, config: DeploymentConfig) -> ModelConfig:
    cfg = ModelConfig.from_pretrained(model)
    if config.dtype:
        cfg.dtype = DTYPES[config.dtype]
    if config.pp_size > cfg.num_layers:
        raise ValueError(f"pp_size {config.pp_size} exceeds the model's {cfg.num_layers} layers")
    return cfg


class DeploymentError(RuntimeError):
    """The deployment could not start, or lost what it needs to serve."""


class Controller(RequestFrontend):
    poll_interval_s = 0.05  # how often an idle caller should still step (health, recovery)

    def __init__(self, model: str, config: DeploymentConfig | None = None, tokenizer=None):
        self.config = config = config or DeploymentConfig()
        config.validate()
        self.model = os.path.abspath(model)
        self.model_config = cfg = _model_config(model, config)
        # What workers must have loaded too (as JSON decodes it, to compare).
        self.checkpoint = json.loads(fingerprint.encode(fingerprint.fingerprint(model)))
        self._closed = False
        self.launcher = None
        self.membership = None
        self._plan_slots(config, cfg)
        self.recovery = Recovery(self)
        try:
            token = self._open_control_plane(config)
            self._start(model, cfg, token, tokenizer)
        except BaseException:
            self.shutdown()
            raise

    def _plan_slots(self, config: DeploymentConfig, cfg: ModelConfig) -> None:
        """The workers' slots and their devices, a KV pool per slot, the
        replication ring over them, and the pipeline instances."""
        sizes = StagePools.of(config, cfg)
        self.stage_blocks = sizes.live_blocks
        self.slot_devices = config.slot_devices()
        note = sharing_note(self.slot_devices)
        if note:
            log.warning(note)
        self.workers = WorkerTable(config.num_instances, config.pp_size)
        self.events = EventLog()
        self.health = HealthMonitor(config.hang_timeout_s)
        self._generations = itertools.count()
        self.pools: dict[str, BlockManager] = {}
        self.replication = Replication(self.workers, self.pools, sizes.replica_blocks,
                                       config.block_size, sizes.block_bytes, self.send,
                                       self.call_off, lambda: next(self._generations))
        for name in self.workers.names():
            self.pools[name] = self._new_pool(name)
        self.instances = []
        for i in range(config.num_instances):
            workers = [f"w{i}.{s}" for s in range(config.pp_size)]
            self.instances.append(PipelineInstance(
                i, workers, [self.pools[w] for w in workers], config.max_num_batched_tokens,
                config.max_num_seqs, config.max_in_flight or config.pp_size,
                on_free=self.replication.forget))
        self.owner: dict[Sequence, PipelineInstance] = {}
        self._steps = itertools.count()
        self._undelivered: list[RequestOutput] = []  # ended outside a result (failures)

    def _open_control_plane(self, config: DeploymentConfig) -> str:
        """The rendezvous store, the control socket, the launcher (when this
        controller spawns its workers) and membership. Returns the join token:
        the configured one, or a new one that only the workers this controller
        spawns are given."""
        self.hosted_store = HostedStore(config.host, config.store_port, config.start_timeout_s)
        self.store = self.hosted_store.store
        token = config.join_token or new_token()
        self.endpoint = ControllerEndpoint(JoinKeys(token), config.host, config.port)
        self.address = f"{config.host}:{self.endpoint.port}"
        log.info("controller on %s, rendezvous store on port %d", self.address,
                 self.hosted_store.port)
        if config.spawn_workers:  # else None, as set before
            self.launcher = LocalLauncher(self._local_address(), token, config.worker_threads,
                                          config.instance_cpus)
        self.membership = Membership(self)
        # Recovery's view of the workers' processes is membership's.
        self.discard, self.spawn = self.membership.discard, self.membership.spawn
        return token

    def _start(self, model: str, cfg: ModelConfig, token: str, tokenizer) -> None:
        """Spawns the workers (or says how to start them), loads the tokenizer
        meanwhile, and waits until every instance serves."""
        config = self.config
        if self.launcher:
            for name in self.workers.names():
                self.spawn(name)
        else:
            log.info("waiting for %d workers: start each with `kevlarflow worker --controller "
                     "%s` and the join token in $%s%s", len(self.workers.records),
                     self.address, TOKEN_ENV, "" if config.join_token else f" (this one: {token})")
        # While the workers start (import torch, load their stages): the
        # import of transformers alone takes seconds.
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                            cfg.max_position_embeddings)
        super().__init__(tokenizer, cfg.vocab_size, cfg.eos_token_ids, max_model_len,
                         min(self.stage_blocks) * config.block_size)
        self._wait_until_serving(config.start_timeout_s)
        self.membership.started = True

    def _new_pool(self, worker: str) -> BlockManager:
        stage = self.workers[worker].stage
        pool = BlockManager(self.stage_blocks[stage] + self.replication.replica_blocks[stage],
                            self.config.block_size, self.config.enable_prefix_caching, pool=worker)
        self.replication.new_pool(worker, pool)
        return pool

    def _local_address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{host}:{self.endpoint.port}"

    def _wait_until_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(inst.serving for inst in self.instances):
            if time.monotonic() > deadline:
                ready = [r.name for r in self.workers if r.ready]
                raise DeploymentError(f"workers not ready after {timeout_s:.0f} s: ready "
                                      f"{sorted(ready)} of {self.workers.names()}")
            self.membership.check()
            self.membership.handle(self.endpoint.recv(100))

    # Recovery's view: what ft.recovery reads (config, instances, workers,
    # pools, replication, events) and does ---------------------------------------

    def send(self, to: str, type_: str, /, **fields) -> None:
        """A control message to worker `to`'s main socket; dropped if it is gone."""
        peer = self.workers[to].peer
        if peer is not None:
            self.endpoint.send(peer, type_, **fields)

    def call_off(self, group: str, generation: int, members: list[str], reason: str) -> None:
        abandon_generation(self.store, group, generation, len(members), reason)

    def build(self, inst: PipelineInstance, route: list[str]) -> None:
        """To the heartbeat sockets: a worker in a forward pass (a borrowed
        one serves another pipeline) starts connecting at once."""
        inst.generation = next(self._generations)
        backend, why = choose_backend(
            [Placement(self.workers[w].host, self.workers[w].device, self.workers[w].nccl)
             for w in route], self.config.transport)
        log.info("%s generation %d over %s (%s)", inst.group, inst.generation, backend, why)
        for w in route:
            record = self.workers[w]
            peer = record.heartbeat_peer or record.peer
            if peer is not None:
                self.endpoint.send(peer, "build_group", group=inst.group, members=route,
                                   generation=inst.generation, backend=backend)

    def abort_generation(self, inst: PipelineInstance, reason: str) -> None:
        """Through the heartbeat sockets, so that a worker blocked in an op of
        the group wakes at once; and in the store, so that a build of it
        still under way gives up wherever it runs."""
        if inst.generation < 0:
            return
        for w in inst.workers:
            peer = self.workers[w].heartbeat_peer
            if peer is not None:
                self.endpoint.send(peer, "abort_group", group=inst.group,
                                   generation=inst.generation)
        self.call_off(inst.group, inst.generation, inst.workers, reason)
        inst.generation = -1  # steps of the old generation are stale everywhere

    def fail_requests(self, inst: PipelineInstance, reason: str) -> None:
        """The instance's requests end with an error (never a hang)."""
        if inst.sequences:
            self.events.record("requests_failed", instance=inst.index,
                               detail=f"{len(inst.sequences)} requests: {reason}")
        for seq in list(inst.sequences):
            seq.finish_reason = "error"
            self._undelivered.append(self._finish(seq, "", []))

    def status(self) -> DeploymentStatus:
        """A typed snapshot, safe to take from another thread."""
        return snapshot(self)

    def worker_loaded(self, name: str) -> None:
        """A worker finished loading: a new process, so an empty pool."""
        self.pools[name] = self._new_pool(name)
        self.recovery.worker_ready(name)

    def inject_fault(self, instance: int, stage: int, kind: str = "kill") -> None:
        """A real fault (SIGKILL for "kill", SIGSTOP for "hang") to the process
        of slot (instance, stage), whatever it is doing. For tests, benchmarks
        and demos."""
        self.membership.inject_fault(instance, stage, kind)

    # Requests --------------------------------------------------------------------

    def _submit(self, seq: Sequence) -> None:
        inst = pick_instance(self.instances)
        self.owner[seq] = inst
        inst.add(seq)

    def _release(self, seq: Sequence) -> None:
        inst = self.owner.pop(seq)
        inst.sequences.discard(seq)
        inst.scheduler.drop(seq)
        self.replication.forget(seq)
        if seq not in inst.busy:  # else a stage may still write its blocks: freed on return
            inst.blocks.free_sequence(seq)

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    # Steps -------------------------------------------------------------------------

    def step(self, timeout_s: float = 0.1) -> list[RequestOutput]:
        """Fill every serving pipeline with micro-batches, then collect what
        comes back within timeout_s. Returns the outputs of this round."""
        # What arrived while nobody was stepping first: heartbeats queued during
        # a pause of the caller must count before the deadline is checked.
        outputs = self._drain()
        self.membership.check()
        outputs, self._undelivered = self._undelivered + outputs, []
        for inst in self.instances:
            if self.recovery.yields(inst):
                continue
            # The first steps after a failure resume the interrupted requests
            # alone: new ones would make those steps, and the stall, longer.
            first = self.recovery.awaits_first_step(inst)
            while inst.can_dispatch():
                batch = inst.schedule(admit=not first)
                if not batch:
                    break
                self._dispatch(inst, batch, priority=first)
        # Wait only while tokens are due; otherwise just take what is there.
        waiting = self.recovery.busy() or any(inst.in_flight for inst in self.instances)
        received = self.endpoint.recv(int(timeout_s * 1000) if waiting else 0,
                                      self.launcher.exit_fds() if self.launcher else ())
        if received is not None:
            outputs += self.membership.handle(received) + self._drain()
        return outputs

    def _drain(self) -> list[RequestOutput]:
        outputs = []
        received = self.endpoint.recv(0)
        while received is not None:
            outputs += self.membership.handle(received)
            received = self.endpoint.recv(0)
        return outputs

    def _dispatch(self, inst: PipelineInstance, batch, priority: bool) -> None:
        step = next(self._steps)
        messages, sampled = inst.stage_messages(step, batch)
        for worker, message in zip(inst.workers, messages):
            self.send(worker, "step", generation=inst.generation, priority=priority,
                      replicate=self.replication.pairs(worker, batch.items, step), **message)
        inst.in_flight[step] = MicroBatch(step, batch, sampled)
        inst.steps_dispatched += 1
        inst.peak_in_flight = max(inst.peak_in_flight, len(inst.in_flight))
        inst.busy.update(seq for seq, _ in batch.items)

    def instance_of_step(self, step: int | None) -> PipelineInstance | None:
        """The instance with that step in flight; None if it was given up on."""
        return next((inst for inst in self.instances if step in inst.in_flight), None)

    def on_result(self, name: str, m: dict) -> list[RequestOutput]:
        inst = self.instance_of_step(m["step"])
        mb = inst.in_flight.get(m["step"]) if inst else None
        if mb is None or name != inst.workers[-1] or len(m["tokens"]) != len(mb.sampled) \
                or len(m["logprobs"]) != len(mb.sampled):
            log.info("dropped a result for step %d from %s that matches no batch", m["step"], name)
            return []
        del inst.in_flight[m["step"]]
        self.recovery.step_completed(inst)
        for seq, n in mb.batch.items:
            inst.busy.discard(seq)
            if seq.is_finished:  # aborted while in flight
                inst.blocks.free_sequence(seq)
                continue
            seq.num_computed_tokens += n
            seq.tokens_run += n
            inst.blocks.register_full_blocks(seq)
        now = time.time()
        outputs = []
        for seq, token, lp in zip(mb.sampled, m["tokens"], m["logprobs"]):
            if not seq.is_finished:
                logprob, top = (None, None) if lp is None else (lp[0], [tuple(p) for p in lp[1]])
                outputs.append(self._append_sampled(seq, token, now, logprob, top))
        return outputs

    def on_bad_step(self, name: str, step: int | None, message: str) -> None:
        """A step the worker refused: a bug; the requests end, not the process."""
        inst = self.instance_of_step(step) or self.instances[self.workers[name].instance]
        inst.in_flight.clear()
        inst.busy.clear()
        self.fail_requests(inst, f"{name}: {message}")

    # Shutdown ------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        endpoint = getattr(self, "endpoint", None)
        told = set()
        if endpoint is not None:
            for record in self.workers:
                if record.peer is not None:
                    endpoint.send(record.peer, "shutdown")
                    told.add((record.instance, record.stage))
        if getattr(self, "launcher", None):
            # A process that has not registered (a replacement still
            # starting) holds nothing yet, and would wait for a controller
            # that is going away: it is killed at once.
            self.launcher.stop(told)
        if endpoint is not None:
            endpoint.close()
        self.store = None
        if getattr(self, "hosted_store", None) is not None:
            self.hosted_store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
