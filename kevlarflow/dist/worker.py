"""A worker process: one pipeline stage of one instance.

It registers with the controller, is assigned a stage, loads that stage's
weights and allocates its KV pool on its own, and only then joins the
communicators the controller asks for: weights and communicators have
separate lives. After that it executes the micro-batches the controller sends,
in order: the first stage embeds token ids, the others receive hidden states
from the previous stage; all but the last send theirs on; the last samples
and returns tokens to the controller."""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch

from kevlarflow.dist.comm import CommError
from kevlarflow.dist.control import Waker, WorkerEndpoint
from kevlarflow.dist.heartbeat import Heartbeat
from kevlarflow.dist.replication import LINK_PREFIX, WorkerReplication
from kevlarflow.dist.worker_groups import WorkerGroups
from kevlarflow.engine.model_runner import allocate_kv_cache, attention_metadata
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sampler import Sampler, request_generator
from kevlarflow.model.config import DTYPES, ModelConfig
from kevlarflow.model.loader import load_stage
from kevlarflow.model.stage import StageSpec

log = logging.getLogger("kevlarflow.worker")

POLL_MS = 200
MAX_PENDING_SENDS = 4  # hidden states on their way to the next stage
CONNECT_TIMEOUT_S = 120.0  # for a worker started before its controller listens


class BadStep(ValueError):
    """A step message that is well-formed but cannot be executed here."""


@dataclass
class _Prepared:
    """A step whose inputs are in hand, ready for the forward pass."""
    message: dict
    members: list[str]
    me: int                     # this worker's index in members
    chunks: list[tuple[int, int, list[int]]]
    num_tokens: int
    inputs: torch.Tensor        # token ids (first stage) or hidden states
    rows: torch.Tensor | None   # rows to sample, last stage only


class Worker:
    def __init__(self, controller: str, instance: int | None = None, stage: int | None = None,
                 threads: int = 1, parent_pid: int | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S):
        torch.set_num_threads(threads)
        self.controller_host = controller.rsplit(":", 1)[0]
        self.waker = Waker()
        self.endpoint = WorkerEndpoint(controller, self.waker)
        self.name: str | None = None  # assigned by the controller
        self.stage = None
        self.groups = WorkerGroups(self._new_comm, self.waker.wake)
        self.replication: WorkerReplication | None = None
        self.controller = controller
        self.connect_timeout_s = connect_timeout_s
        self.stop_reason: str | None = None  # set from the heartbeat thread
        self.pending_sends: deque = deque()
        self.backlog: deque = deque()  # messages read ahead while looking for a step to merge
        self.merged_steps = 0
        self.sampler = Sampler()
        self.endpoint.send("register", pid=os.getpid(), host=socket.gethostname(),
                           instance=instance, stage=stage)
        self.heartbeat = Heartbeat(self, controller, parent_pid)
        self.heartbeat.start()

    @property
    def label(self) -> str:
        return self.name or "unassigned worker"

    # Loop -------------------------------------------------------------------

    def run(self) -> None:
        try:
            while self.stop_reason is None:
                message = self.backlog.popleft() if self.backlog else self.endpoint.recv(POLL_MS)
                self._finish_builds()
                if message is None:
                    continue
                if message["type"] == "shutdown":
                    return
                self.handle(message)
        finally:
            self.close()

    def handle(self, m: dict) -> None:
        kind = m["type"]
        if kind == "assign":
            if self.stage is not None:
                log.warning("%s: ignored a second assignment", self.label)
                return
            self._assign(m)
        elif self.stage is None:
            log.warning("unassigned worker: ignored %s", kind)
        elif kind == "build_group":
            self._build_group(m)
        elif kind == "leave_group":
            self._leave_group(m["group"])
        elif kind == "step":
            self._step(m)

    def controller_lost(self, reason: str) -> None:
        """From the heartbeat thread: stop serving and exit. Aborting every
        group wakes the main thread if an op holds it."""
        log.warning("%s: %s; exiting", self.label, reason)
        self.stop_reason = reason
        self.groups.abort_all()
        self.waker.wake()

    def close(self) -> None:
        self.heartbeat.stopping.set()
        self.heartbeat.join(timeout=5)
        if self.stop_reason is None:
            try:
                self._drain_sends()
            except Exception as error:  # noqa: BLE001  (a dead next stage: nothing left to do)
                log.info("%s: unsent hidden states at exit: %s", self.label, error)
        if self.replication is not None:
            self.replication.close()
        self.groups.close()
        self.endpoint.close()
        self.waker.close()

    # Assignment: weights and KV pool first, communicators later --------------

    def _assign(self, m: dict) -> None:
        start = time.perf_counter()
        self.name = m["worker"]  # heartbeats start now: loading is watched too
        torch.set_num_threads(m["threads"])
        cfg = ModelConfig.from_pretrained(m["model"])
        dtype = DTYPES[m["dtype"]] if m["dtype"] else None
        self.spec = StageSpec.split(cfg.num_layers, m["num_stages"], m["stage"])
        self.stage = load_stage(m["model"], self.spec, cfg, dtype, progress=False,
                                max_positions=m["max_model_len"])
        self.cfg = self.stage.cfg
        self.block_size, self.num_blocks = m["block_size"], m["num_blocks"]
        # Replica blocks follow the live ones in the same caches: after a
        # failure the controller makes them live blocks without a copy.
        self.total_blocks = self.num_blocks + m["replica_blocks"]
        self.transfer_bytes = m["replication_transfer_bytes"]
        self.replication_interval_s = m["replication_interval_s"]
        self.kv_caches = allocate_kv_cache(self.stage, self.total_blocks, self.block_size)
        self.attention_backend = m["attention_backend"]
        self.max_model_len = m["max_model_len"]
        self.store_port, self.deadline_s = m["store_port"], m["deadline_s"]
        self.heartbeat.interval_ms = max(1, int(m["heartbeat_s"] * 1000))
        load_s = time.perf_counter() - start
        log.info("%s: stage %d layers [%d, %d) loaded in %.2f s, %d KV blocks", self.name,
                 m["stage"], self.spec.first_layer, self.spec.end_layer, load_s, self.num_blocks)
        self.endpoint.send("ready", worker=self.name, load_s=load_s, num_blocks=self.num_blocks)

    def _build_group(self, m: dict) -> None:
        group, members = m["group"], m["members"]
        if self.name not in members:
            log.warning("%s: asked to join %s, whose members %s exclude it", self.name, group, members)
            return
        if group.startswith(LINK_PREFIX) and self.replication is not None:
            self.replication.leave(group)  # a link's threads stop before it is rebuilt
        self._drop_sends(group)
        self.groups.build(group, members, m["generation"])

    def _finish_builds(self) -> None:
        """Report the builds that ended: a link starts replicating at once."""
        for build in self.groups.collect():
            if build.error is not None:
                log.info("%s: %s", self.name, build.error)
                self.endpoint.send("group_failed", group=build.group, generation=build.generation,
                                   message=str(build.error))
                continue
            if build.group.startswith(LINK_PREFIX):
                self._replication().joined(build.group, build.members, build.generation)
            self.endpoint.send("group_ready", group=build.group, generation=build.generation)

    def _leave_group(self, group: str) -> None:
        """Stop using group for good; for a replication link, also wait until
        its threads are done (its blocks may become live blocks next)."""
        if self.replication is not None:
            self.replication.leave(group)
        self.groups.stop(group, "left")
        self._drop_sends(group)

    def _replication(self) -> WorkerReplication:
        if self.replication is None:
            self.replication = WorkerReplication(self.name, self.controller, self.groups.manager(),
                                                 self.kv_caches, self.transfer_bytes,
                                                 self.replication_interval_s, self.deadline_s)
        return self.replication

    def abort_generation(self, group: str, generation: int) -> None:
        """From the heartbeat thread: give up on that generation of group, if
        it is the current one or the one being built, and wake the main thread
        if it is blocked in an op of it. A newer generation is left alone."""
        self.groups.abort(group, generation, "aborted by the controller")

    def _drop_sends(self, group: str) -> None:
        """Hidden states still on their way on group: nobody waits for them."""
        self.pending_sends = deque(p for p in self.pending_sends if p[1] != group)

    def _new_comm(self):
        from kevlarflow.dist.comm import CommManager

        def client() -> torch.distributed.TCPStore:
            return torch.distributed.TCPStore(
                self.controller_host, self.store_port, is_master=False,
                timeout=timedelta(seconds=max(30.0, self.deadline_s)))
        return CommManager(client(), self.name, deadline_s=self.deadline_s, connect_store=client)

    # One micro-batch ----------------------------------------------------------

    def _step(self, m: dict) -> None:
        steps = [m]
        partner = self._merge_partner(m["group"])  # borrowed: it serves two pipelines
        if partner is not None:
            steps.append(partner)
            self.merged_steps += 1
            if self.merged_steps == 1:
                log.info("%s: merging the steps of %s and %s into one forward pass",
                         self.name, m["group"], partner["group"])
        prepared = []
        for step in steps:
            try:
                inputs = self._prepare(step)
            except (BadStep, CommError) as error:
                self._report(step, error)
                continue
            if inputs is not None:
                prepared.append(inputs)
        if not prepared:
            return
        # One forward pass over the micro-batches of both pipelines: decode is
        # bound by reading the weights, so the larger batch costs little more.
        chunks = [c for p in prepared for c in p.chunks]
        inputs = torch.cat([p.inputs for p in prepared])
        rows, offset = None, 0
        if self.spec.is_last:
            parts = []
            for p in prepared:
                parts.append(p.rows + offset)
                offset += p.num_tokens
            rows = torch.cat(parts)
        out = self.stage(inputs, attention_metadata(chunks, self.block_size), self.kv_caches,
                         logits_indices=rows, attention_backend=self.attention_backend)
        if self.replication is not None:  # the KV of these steps is written: copy it out
            for p in prepared:
                self.replication.submit(p.message["replicate"] or [], p.message["step"])
        start = 0
        for p in prepared:
            size = len(p.rows) if self.spec.is_last else p.num_tokens
            try:
                self._finish_step(p, out[start:start + size])
            except CommError as error:
                self._report(p.message, error)
            start += size

    def _report(self, m: dict, error: Exception) -> None:
        self._report_step(m["step"], error)

    def _report_step(self, step: int, error: Exception) -> None:
        kind = "bad_step" if isinstance(error, BadStep) else "comm"
        log.warning("%s: step %d: %s: %s", self.name, step, kind, error)
        self.endpoint.send("error", step=step, kind=kind, message=str(error))

    def _take_in(self) -> None:
        """Queue what has arrived, without waiting."""
        message = self.endpoint.recv(0)
        while message is not None:
            self.backlog.append(message)
            message = self.endpoint.recv(0)

    def _merge_partner(self, group: str) -> dict | None:
        """The next step of another pipeline, if it is already queued and
        nothing that must run before it (a rebuild, a shutdown) is in the way."""
        self._take_in()
        for i, message in enumerate(self.backlog):
            if message["type"] != "step":
                return None
            if message["group"] != group:
                del self.backlog[i]
                return message
        return None

    def _prepare(self, m: dict) -> "_Prepared | None":
        """Check a step and gather its inputs; None for a stale step."""
        if not self.groups.known(m["group"]):
            raise BadStep(f"not a member of group {m['group']!r}")
        members = self.groups.members(m["group"])
        if members is None or m["generation"] != self.groups.generation(m["group"]):
            return None  # sent before the group was aborted or rebuilt: nobody waits for it
        chunks = self._check_chunks(m["seqs"])
        num_tokens = sum(n for n, _, _ in chunks)
        me = members.index(self.name)
        rows = None
        if self.spec.is_last:
            sample = m["sample"]
            if sample is None or len(sample) != len(chunks):
                raise BadStep("the last stage needs one sample entry per sequence")
            ends = torch.tensor([n for n, _, _ in chunks]).cumsum(0) - 1
            rows = ends[[i for i, s in enumerate(sample) if s is not None]]
        if self.spec.is_first:
            ids = m["token_ids"]
            if ids is None or len(ids) != num_tokens or \
                    not all(0 <= t < self.cfg.vocab_size for t in ids):
                raise BadStep(f"the first stage needs {num_tokens} token ids in [0, vocab)")
            inputs = torch.tensor(ids, dtype=torch.int64)
        else:
            inputs = self._recv_hidden(m["group"], members[me - 1], num_tokens)
        return _Prepared(m, members, me, chunks, num_tokens, inputs, rows)

    def _finish_step(self, p: "_Prepared", out: torch.Tensor) -> None:
        if not self.spec.is_last:
            self._send_hidden(p.message["step"], p.message["group"], p.members[p.me + 1], out)
        else:
            self._sample_and_reply(p.message["step"],
                                   [s for s in p.message["sample"] if s is not None], out)

    def _check_chunks(self, seqs: list) -> list[tuple[int, int, list[int]]]:
        if not seqs:
            raise BadStep("a step needs at least one sequence")
        for n, start, table in seqs:
            if n < 1 or start < 0 or start + n > len(table) * self.block_size:
                raise BadStep(f"chunk of {n} tokens at {start} does not fit its "
                              f"{len(table)} blocks")
            if start + n > self.max_model_len:
                raise BadStep(f"positions up to {start + n} exceed max_model_len {self.max_model_len}")
            if not all(0 <= b < self.total_blocks for b in table):
                raise BadStep(f"block ids must be in [0, {self.total_blocks})")
        return [(n, start, table) for n, start, table in seqs]

    # Hidden states between stages -----------------------------------------------

    def _recv_hidden(self, group: str, src: str, num_tokens: int) -> torch.Tensor:
        width = self.cfg.hidden_size * self.cfg.dtype.itemsize
        buffer = torch.empty(num_tokens, width, dtype=torch.uint8)  # bytes: any dtype travels
        self.groups.manager().recv(group, buffer, src)
        return buffer.view(self.cfg.dtype)

    def _send_hidden(self, step: int, group: str, dst: str, hidden: torch.Tensor) -> None:
        while len(self.pending_sends) >= MAX_PENDING_SENDS:
            self._wait_oldest_send()
        op = self.groups.manager().isend(group, hidden.contiguous().view(torch.uint8), dst)
        self.pending_sends.append((step, group, self.groups.generation(group), op))

    def _wait_oldest_send(self) -> None:
        """A send that failed is reported as its own step's error: it may be
        of another pipeline than the step that waits for room (a borrowed
        worker sends for two)."""
        step, group, generation, op = self.pending_sends.popleft()
        try:
            op.wait()
        except CommError as error:
            if generation == self.groups.generation(group):
                self._report_step(step, error)
            # else: a generation given up on meanwhile; nobody waits for it

    def _drain_sends(self) -> None:
        while self.pending_sends:
            self._wait_oldest_send()

    # Sampling on the last stage ---------------------------------------------------

    def _sample_and_reply(self, step: int, rows: list[dict], logits: torch.Tensor) -> None:
        params = [SamplingParams(temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"],
                                 min_p=r["min_p"], seed=r["seed"], logprobs=r["logprobs"])
                  for r in rows]
        generators = [request_generator(p, r["index"]) for p, r in zip(params, rows)]
        out = self.sampler(logits, params, generators)
        logprobs = [None if lp is None else [lp, [list(pair) for pair in top]]
                    for lp, top in zip(out.logprobs, out.top_logprobs)]
        self.endpoint.send("result", step=step, tokens=out.token_ids, logprobs=logprobs)


def main(controller: str, instance: int | None, stage: int | None, threads: int,
         parent_pid: int | None) -> int:
    logging.basicConfig(level=os.environ.get("KEVLARFLOW_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s")
    worker = Worker(controller, instance, stage, threads, parent_pid)
    worker.run()
    return 0
