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
from kevlarflow.dist.control import WorkerEndpoint
from kevlarflow.dist.heartbeat import Heartbeat
from kevlarflow.dist.replication import LINK_PREFIX, WorkerReplication
from kevlarflow.engine.model_runner import allocate_kv_cache, attention_metadata
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sampler import Sampler, request_generator
from kevlarflow.model.config import DTYPES, ModelConfig
from kevlarflow.model.loader import load_stage
from kevlarflow.model.stage import StageSpec

log = logging.getLogger("kevlarflow.worker")

POLL_MS = 200
MAX_PENDING_SENDS = 4  # hidden states on their way to the next stage


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
                 threads: int = 1, parent_pid: int | None = None):
        torch.set_num_threads(threads)
        self.controller_host = controller.rsplit(":", 1)[0]
        self.endpoint = WorkerEndpoint(controller)
        self.parent_pid = parent_pid
        self.name = "unassigned"
        self.stage = None
        self.comm = None
        self.replication: WorkerReplication | None = None
        self.groups: dict[str, list[str]] = {}
        self.generations: dict[str, int] = {}  # current generation of each group
        self.controller = controller
        self.heartbeat: Heartbeat | None = None
        self.pending_sends: deque = deque()
        self.backlog: deque = deque()  # messages read ahead while looking for a step to merge
        self.merged_steps = 0
        self.sampler = Sampler()
        self.endpoint.send("register", pid=os.getpid(), host=socket.gethostname(),
                           instance=instance, stage=stage)

    # Loop -------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.warning("%s: the controller process is gone; exiting", self.name)
                    return
                message = self.backlog.popleft() if self.backlog else self.endpoint.recv(POLL_MS)
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
                log.warning("%s: ignored a second assignment", self.name)
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

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stopping.set()
            self.heartbeat.join(timeout=5)
        try:
            self._drain_sends()
        except Exception as error:  # noqa: BLE001  (a dead next stage: nothing left to do)
            log.info("%s: unsent hidden states at exit: %s", self.name, error)
        if self.replication is not None:
            self.replication.close()
        if self.comm is not None:
            self.comm.close()
        self.endpoint.close()

    # Assignment: weights and KV pool first, communicators later --------------

    def _assign(self, m: dict) -> None:
        start = time.perf_counter()
        self.name = m["worker"]
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
        self.heartbeat = Heartbeat(self, self.controller, m["heartbeat_s"])
        self.heartbeat.start()
        load_s = time.perf_counter() - start
        log.info("%s: stage %d layers [%d, %d) loaded in %.2f s, %d KV blocks", self.name,
                 m["stage"], self.spec.first_layer, self.spec.end_layer, load_s, self.num_blocks)
        self.endpoint.send("ready", worker=self.name, load_s=load_s, num_blocks=self.num_blocks)

    def _build_group(self, m: dict) -> None:
        group, members = m["group"], m["members"]
        if self.name not in members:
            log.warning("%s: asked to join %s, whose members %s exclude it", self.name, group, members)
            return
        if self._superseded(group):
            log.info("%s: skipped an outdated build of %s", self.name, group)
            return
        link = group.startswith(LINK_PREFIX)
        if link:
            self._leave_group(group)
        self.abort_group(group)  # a rebuild replaces whatever generation was there
        try:
            if len(members) > 1:  # a one-member pipeline talks to no one
                self._comm().build(group, members, generation=m["generation"])
        except CommError as error:  # a link's failure concerns replication only
            self.endpoint.send("error", step=None, kind="link" if link else "comm",
                               message=str(error))
            return
        self.groups[group] = members
        self.generations[group] = m["generation"]
        if link:
            self._replication().joined(group, members, m["generation"])
        self.endpoint.send("group_ready", group=group, generation=m["generation"])

    def _leave_group(self, group: str) -> None:
        """Stop using group for good; for a replication link, also wait until
        its threads are done (its blocks may become live blocks next)."""
        if self.replication is not None:
            self.replication.leave(group)
        self.abort_group(group)
        self.groups.pop(group, None)

    def _replication(self) -> WorkerReplication:
        if self.replication is None:
            self.replication = WorkerReplication(self.name, self.controller, self._comm(),
                                                 self.kv_caches, self.transfer_bytes,
                                                 self.replication_interval_s, self.deadline_s)
        return self.replication

    def abort_generation(self, group: str, generation: int) -> None:
        """From the heartbeat thread: give up on that generation of group, if
        it is still the current one, and wake the main thread if it is blocked
        in an op of it. (A newer generation may already be built or being
        built: then this is old news and touches nothing.)"""
        # While a build runs its group has no current generation (abort_group
        # below cleared it): an abort can never hit a generation being built.
        if self.generations.get(group) != generation:
            return
        self.generations.pop(group, None)
        if self.comm is not None:
            self.comm.abort(group)

    def abort_group(self, group: str) -> None:
        """Stop using the current generation of group: ops blocked in it fail
        at once, its queued steps are skipped, its unsent hidden states dropped.
        Called from the heartbeat thread as well as the main one."""
        self.generations.pop(group, None)
        if self.comm is not None:
            self.comm.abort(group)
        self.pending_sends = deque(p for p in self.pending_sends if p[0] != group)

    def _comm(self):
        """The communicator manager, made when the first group needs it: the
        store and the data plane are not needed before."""
        if self.comm is None:
            from kevlarflow.dist.comm import CommManager

            store = torch.distributed.TCPStore(self.controller_host, self.store_port, is_master=False,
                                               timeout=timedelta(seconds=max(30.0, self.deadline_s)))
            self.comm = CommManager(store, self.name, deadline_s=self.deadline_s)
        return self.comm

    # One micro-batch ----------------------------------------------------------

    def _step(self, m: dict) -> None:
        steps = [m]
        if len(self.groups) > 1:  # borrowed: serving two pipelines
            partner = self._merge_partner(m["group"])
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
        kind = "bad_step" if isinstance(error, BadStep) else "comm"
        log.warning("%s: step %d: %s: %s", self.name, m["step"], kind, error)
        self.endpoint.send("error", step=m["step"], kind=kind, message=str(error))

    def _take_in(self) -> None:
        """Queue what has arrived, without waiting."""
        message = self.endpoint.recv(0)
        while message is not None:
            self.backlog.append(message)
            message = self.endpoint.recv(0)

    def _superseded(self, group: str) -> bool:
        """A later build or leave of group is queued already: this build would
        only wait, up to the deadline, for members that have moved on (and
        builds skipped this way keep every worker's builds in one order)."""
        self._take_in()
        return any(m["type"] in ("build_group", "leave_group") and m["group"] == group
                   for m in self.backlog)

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
        members = self.groups.get(m["group"])
        if members is None:
            raise BadStep(f"not a member of group {m['group']!r}")
        if m["generation"] != self.generations.get(m["group"]):
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
            self._send_hidden(p.message["group"], p.members[p.me + 1], out)
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
        self.comm.recv(group, buffer, src)
        return buffer.view(self.cfg.dtype)

    def _send_hidden(self, group: str, dst: str, hidden: torch.Tensor) -> None:
        while len(self.pending_sends) >= MAX_PENDING_SENDS:
            self._wait_oldest_send()
        op = self.comm.isend(group, hidden.contiguous().view(torch.uint8), dst)
        self.pending_sends.append((group, self.generations.get(group), op))

    def _wait_oldest_send(self) -> None:
        group, generation, op = self.pending_sends.popleft()
        try:
            op.wait()
        except CommError:
            if generation == self.generations.get(group):
                raise  # else: a generation given up on meanwhile; nobody waits for it

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
