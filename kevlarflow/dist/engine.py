"""The controller of a deployment: num_instances pipeline instances of pp_size
stage workers each, behind one request API (the same as LLMEngine's).

The controller hosts the rendezvous store (torch.distributed's TCPStore) and
the control socket, starts the workers (or waits for external ones to
register), assigns each a slot, and once every worker of an instance has
loaded its stage, asks them to build the instance's communicator. Then step()
keeps each instance's pipeline full of micro-batches and turns the tokens
that come back into outputs."""
from __future__ import annotations

import itertools
import logging
import os
import time
from datetime import timedelta

import torch

from kevlarflow.dist.config import DeploymentConfig, StagePools
from kevlarflow.dist.control import ControllerEndpoint
from kevlarflow.dist.instance import MicroBatch, PipelineInstance
from kevlarflow.dist.launcher import LocalLauncher
from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.frontend import RequestFrontend
from kevlarflow.engine.outputs import RequestOutput, TokenLogprob
from kevlarflow.engine.sequence import Sequence
from kevlarflow.ft.events import EventLog
from kevlarflow.ft.health import HealthMonitor
from kevlarflow.ft.recovery import RecoveryMixin
from kevlarflow.ft.replication import Replication
from kevlarflow.ft.router import pick_instance
from kevlarflow.model.config import DTYPES, ModelConfig

log = logging.getLogger("kevlarflow.controller")

__all__ = ["DeploymentConfig", "DeploymentError", "DistributedEngine"]

class DeploymentError(RuntimeError):
    """The deployment could not start, or lost what it needs to serve."""


class DistributedEngine(RecoveryMixin, RequestFrontend):
    poll_interval_s = 0.05  # how often an idle caller should still step (health, recovery)

    def __init__(self, model: str, config: DeploymentConfig | None = None, tokenizer=None):
        from transformers import AutoTokenizer

        self.config = config = config or DeploymentConfig()
        config.validate()
        self.model = os.path.abspath(model)
        cfg = ModelConfig.from_pretrained(model)
        if config.dtype:
            cfg.dtype = DTYPES[config.dtype]
        if config.pp_size > cfg.num_layers:
            raise ValueError(f"pp_size {config.pp_size} exceeds the model's {cfg.num_layers} layers")
        self.model_config = cfg
        max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                            cfg.max_position_embeddings)
        sizes = StagePools.of(config, cfg)
        self.stage_blocks, self.stage_block_bytes = sizes.live_blocks, sizes.block_bytes
        super().__init__(tokenizer or AutoTokenizer.from_pretrained(model), cfg.vocab_size,
                         cfg.eos_token_ids, max_model_len, min(self.stage_blocks) * config.block_size)

        # Worker name -> its slot (instance, stage), and the allocator of its KV pool.
        self.slot_of = {f"w{i}.{s}": (i, s) for i in range(config.num_instances)
                        for s in range(config.pp_size)}
        self.replication = Replication(self, sizes.replica_blocks)
        self.pools: dict[str, BlockManager] = {w: self._new_pool(w) for w in self.slot_of}
        self.instances = []
        for i in range(config.num_instances):
            workers = [f"w{i}.{s}" for s in range(config.pp_size)]
            self.instances.append(PipelineInstance(
                i, workers, [self.pools[w] for w in workers], config.max_num_batched_tokens,
                config.max_num_seqs, config.max_in_flight or config.pp_size,
                on_free=self.replication.forget))
        self.peer_of: dict[str, bytes] = {}   # worker name -> its control socket identity
        self.worker_of: dict[bytes, str] = {}
        self.heartbeat_peer_of: dict[str, bytes] = {}
        self.pid_of: dict[str, int] = {}
        self.ready: set[str] = set()          # registered, loaded, not failed since
        self.health = HealthMonitor(config.hang_timeout_s)
        self.events = EventLog()
        self.replacing: dict[str, int] = {}   # worker slot -> replacements started for it
        self.rejoining: dict[int, tuple[float, str]] = {}  # instance -> (since, who joined)
        self.owner: dict[Sequence, PipelineInstance] = {}
        self._steps = itertools.count()
        self._generations = itertools.count()
        self._group_acks: dict[str, set[str]] = {}
        self._undelivered: list[RequestOutput] = []  # ended outside a result (failures)
        self._closed = False
        self._started = False
        self.launcher = None

        self.store = torch.distributed.TCPStore(config.host, config.store_port, is_master=True,
                                                wait_for_workers=False,
                                                timeout=timedelta(seconds=config.start_timeout_s))
        self.endpoint = ControllerEndpoint(config.host, config.port)
        self.address = f"{config.host}:{self.endpoint.port}"
        log.info("controller on %s, rendezvous store on port %d", self.address, self.store.port)
        self.launcher = LocalLauncher(self._local_address(), config.worker_threads) \
            if config.spawn_workers else None
        try:
            if self.launcher:
                for inst in self.instances:
                    for s in range(config.pp_size):
                        self.launcher.spawn(inst.index, s)
            else:
                log.info("waiting for %d workers: start each with `kevlarflow worker --controller "
                         "%s`", len(self.slot_of), self.address)
            self._wait_until_serving(config.start_timeout_s)
            self._started = True
        except BaseException:
            self.shutdown()
            raise

    def _new_pool(self, worker: str) -> BlockManager:
        stage = self.slot_of[worker][1]
        pool = BlockManager(self.stage_blocks[stage] + self.replication.replica_blocks[stage],
                            self.config.block_size, self.config.enable_prefix_caching, pool=worker)
        self.replication.new_pool(worker, pool)
        return pool

    def _local_address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{host}:{self.endpoint.port}"

    # Start-up -------------------------------------------------------------------

    def _wait_until_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(inst.serving for inst in self.instances):
            if time.monotonic() > deadline:
                raise DeploymentError(f"workers not ready after {timeout_s:.0f} s: ready "
                                      f"{sorted(self.ready)} of {sorted(self.slot_of)}")
            self._check_processes()
            self._handle(self.endpoint.recv(100))

    def _check_processes(self) -> None:
        """Failures seen by the launcher (an exit) and by the heartbeat deadline."""
        if self.launcher:
            for (i, s), code in self.launcher.exited().items():
                name = f"w{i}.{s}"
                if not self._started:  # a worker that cannot even start: fail fast
                    raise DeploymentError(f"worker {name} exited with code {code} while the "
                                          "deployment was starting (its log is above)")
                if name in self.peer_of or name in self.ready:
                    self.worker_failed(name, f"process exited with code {code}")
                elif name in self.replacing:  # died before it even registered
                    self.events.record("detected", worker=name, instance=i,
                                       detail=f"replacement exited with code {code}")
                    self.launcher.procs.pop((i, s)).wait()
                    self._start_replacement(name)
        for name, silent_s in self.health.silent():
            self.worker_failed(name, f"no heartbeat for {silent_s:.2f} s")
        self.check_suspects()
        self.check_rejoins()

    def _handle(self, received) -> list[RequestOutput]:
        if received is None:
            return []
        peer, m = received
        kind = m["type"]
        if kind == "register":
            self._register(peer, m)
            return []
        if kind == "replicated":  # from a backup's receiver thread
            if m["worker"] in self.ready:
                self.replication.acknowledged(m)
            return []
        if kind == "heartbeat":
            if m["worker"] in self.peer_of:
                self.heartbeat_peer_of[m["worker"]] = peer
                self.health.beat(m["worker"])
            return []
        name = self.worker_of.get(peer)
        if name is None:
            log.warning("dropped %s from an unregistered peer", kind)
            return []
        if kind == "ready":
            self._on_ready(name, m)
        elif kind == "group_ready":
            self._on_group_ready(name, m)
        elif kind == "result":
            return self._on_result(name, m)
        elif kind == "error":
            self._on_error(name, m)
        return []

    def _register(self, peer: bytes, m: dict) -> None:
        wanted = (m["instance"], m["stage"])
        free = [w for w, slot in self.slot_of.items() if w not in self.peer_of]
        if wanted != (None, None):
            free = [w for w in free if self.slot_of[w] == wanted]
        if not free:
            log.warning("worker pid %d on %s asked for slot %s: none free", m["pid"], m["host"], wanted)
            self.endpoint.send(peer, "shutdown")
            return
        name = free[0]
        i, s = self.slot_of[name]
        self.peer_of[name], self.worker_of[peer] = peer, name
        self.pid_of[name] = m["pid"]
        log.info("%s: pid %d on %s", name, m["pid"], m["host"])
        c = self.config
        self.endpoint.send(peer, "assign", worker=name, instance=i, stage=s, num_stages=c.pp_size,
                           model=self.model, dtype=c.dtype, block_size=c.block_size,
                           num_blocks=self.stage_blocks[s], max_model_len=self.max_model_len,
                           store_port=self.store.port, deadline_s=float(c.comm_deadline_s),
                           attention_backend=c.attention_backend, threads=c.worker_threads,
                           heartbeat_s=float(c.heartbeat_s),
                           replica_blocks=self.replication.replica_blocks[s],
                           replication_transfer_bytes=c.replication_transfer_bytes,
                           replication_interval_s=float(c.replication_interval_s))

    def _on_ready(self, name: str, m: dict) -> None:
        log.info("%s: loaded in %.2f s", name, m["load_s"])
        self.ready.add(name)
        self.health.watch(name)
        self.worker_joined(name)

    def _build_group(self, inst: PipelineInstance) -> None:
        """A new generation of inst's communicator over its current workers."""
        inst.generation = next(self._generations)
        self._group_acks[inst.group] = set()
        for w in inst.workers:
            self.endpoint.send(self.peer_of[w], "build_group", group=inst.group,
                               members=inst.workers, generation=inst.generation)

    def _on_group_ready(self, name: str, m: dict) -> None:
        if self.replication.group_ready(name, m["group"], m["generation"]):
            return
        inst = next((i for i in self.instances if i.group == m["group"]), None)
        if inst is None or m["generation"] != inst.generation or name not in inst.workers:
            return  # an acknowledgement of an older generation
        acks = self._group_acks[inst.group]
        acks.add(name)
        if acks.issuperset(inst.workers):
            inst.serving = True
            self.instance_serving(inst)
            log.info("instance %d serving: %s", inst.index, " -> ".join(inst.workers))

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
        self._check_processes()
        outputs, self._undelivered = self._undelivered + outputs, []
        for inst in self.instances:
            while inst.can_dispatch():
                batch = inst.schedule()
                if not batch:
                    break
                self._dispatch(inst, batch)
        # Wait only while tokens are due; otherwise just take what is there.
        waiting = self.replacing or any(inst.in_flight or not inst.serving
                                        for inst in self.instances)
        received = self.endpoint.recv(int(timeout_s * 1000) if waiting else 0)
        if received is not None:
            outputs += self._handle(received) + self._drain()
        return outputs

    def _drain(self) -> list[RequestOutput]:
        outputs = []
        received = self.endpoint.recv(0)
        while received is not None:
            outputs += self._handle(received)
            received = self.endpoint.recv(0)
        return outputs

    def _dispatch(self, inst: PipelineInstance, batch) -> None:
        step = next(self._steps)
        messages, sampled = inst.stage_messages(step, batch)
        for worker, message in zip(inst.workers, messages):
            self.endpoint.send(self.peer_of[worker], "step", generation=inst.generation,
                               replicate=self.replication.pairs(worker, batch.items, step), **message)
        inst.in_flight[step] = MicroBatch(step, batch, sampled, time.monotonic())
        inst.steps_dispatched += 1
        inst.peak_in_flight = max(inst.peak_in_flight, len(inst.in_flight))
        inst.busy.update(seq for seq, _ in batch.items)

    def instance_of_step(self, step: int | None) -> PipelineInstance | None:
        """The instance with that step in flight; None if it was given up on."""
        return next((inst for inst in self.instances if step in inst.in_flight), None)

    def _on_result(self, name: str, m: dict) -> list[RequestOutput]:
        inst = self.instance_of_step(m["step"])
        mb = inst.in_flight.get(m["step"]) if inst else None
        if mb is None or name != inst.workers[-1] or len(m["tokens"]) != len(mb.sampled) \
                or len(m["logprobs"]) != len(mb.sampled):
            log.info("dropped a result for step %d from %s that matches no batch", m["step"], name)
            return []
        del inst.in_flight[m["step"]]
        self.step_completed(inst)
        for seq, n in mb.batch.items:
            inst.busy.discard(seq)
            if seq.is_finished:  # aborted while in flight
                inst.blocks.free_sequence(seq)
                continue
            seq.num_computed_tokens += n
            inst.blocks.register_full_blocks(seq)
        now = time.time()
        outputs = []
        for seq, token, lp in zip(mb.sampled, m["tokens"], m["logprobs"]):
            if seq.is_finished:
                continue
            logprob = None if lp is None else TokenLogprob(token, lp[0], [tuple(p) for p in lp[1]])
            outputs.append(self._append_token(seq, token, now, logprob))
        return outputs

    # Shutdown ------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None:
            for peer in self.peer_of.values():
                endpoint.send(peer, "shutdown")
        if getattr(self, "launcher", None):
            self.launcher.stop()
        if endpoint is not None:
            endpoint.close()
        self.store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
