"""A worker process: one pipeline stage of one instance.

It registers with the controller, is assigned a stage, loads that stage's
weights and allocates its KV pool on its own, and only then joins the
communicators the controller asks for: weights and communicators have
separate lives. After that it executes the micro-batches the controller sends,
in order (steps.py), builds and leaves the communicators it is told to
(kevlarflow.comm.groups), replicates its KV (kevlarflow.replication.worker),
and exits when its controller is gone (heartbeat.py)."""
from __future__ import annotations

import faulthandler
import functools
import logging
import os
import socket
import sys
import threading
import time
from typing import NoReturn

import torch

from kevlarflow.comm import nccl
from kevlarflow.comm.groups import WorkerGroups
from kevlarflow.deploy.control import Waker, WorkerEndpoint
from kevlarflow.deploy.heartbeat import Heartbeat
from kevlarflow.deploy.join import JoinKeys
from kevlarflow.deploy.hidden_states import HiddenStates
from kevlarflow.deploy.read_ahead import ReadAhead
from kevlarflow.deploy.steps import BadStep, StageSteps
from kevlarflow.deploy.store import client as store_client
from kevlarflow.deploy.stage_loading import load_runner
from kevlarflow.engine.model_runner import ModelRunner
from kevlarflow.model import fingerprint
from kevlarflow.model.device import resolve_device
from kevlarflow.replication import is_link
from kevlarflow.replication.worker import WorkerReplication

log = logging.getLogger("kevlarflow.worker")

POLL_MS = 200
CONNECT_TIMEOUT_S = 120.0  # for a worker started before its controller listens


class Worker:
    def __init__(self, controller: str, keys: JoinKeys, instance: int | None = None,
                 stage: int | None = None, threads: int = 1, parent_pid: int | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, device: str | None = None):
        torch.set_num_threads(threads)
        # Its own device, if it was started with one (it knows its machine's
        # GPUs); else the one the controller assigns to its slot.
        self.device = resolve_device(device) if device is not None else None
        self.controller_host = controller.rsplit(":", 1)[0]
        # Every socket to the controller, on any thread, proves the join token.
        self.connect = functools.partial(WorkerEndpoint, controller, keys)
        self.waker = Waker()
        self.endpoint = self.connect(self.waker)
        self.name: str | None = None  # assigned by the controller
        # Its stage of the model, and how it runs steps on it: once assigned.
        self.runner: ModelRunner | None = None
        self.hidden: HiddenStates | None = None
        self.steps: StageSteps | None = None
        self.groups = WorkerGroups(self._new_comm, self._build_ended)
        # Build threads say at once that a pipeline is connected (the main
        # thread may be in a long forward pass): on a socket of their own,
        # one thread at a time.
        self.announcer = self.connect()
        self.announcing = threading.Lock()
        self.replication: WorkerReplication | None = None
        self.connect_timeout_s = connect_timeout_s
        self.stop_reason: str | None = None  # set from the heartbeat thread
        self.refused = False  # by the controller: it never let this worker in
        self.read_ahead = ReadAhead(self.endpoint, POLL_MS, self._finish_builds)
        self.merged_steps = 0
        log.info("registering with the controller at %s (it has %g s to answer)", controller,
                 connect_timeout_s)
        self.endpoint.send("register", pid=os.getpid(), host=socket.gethostname(),
                           instance=instance, stage=stage)
        self.heartbeat = Heartbeat(self, self.connect, parent_pid)
        self.heartbeat.start()

    @property
    def label(self) -> str:
        return self.name or "unassigned worker"

    # Loop -------------------------------------------------------------------

    def run(self) -> None:
        try:
            while self.stop_reason is None:
                message = self.read_ahead.next()
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
            if self.steps is not None:
                log.warning("%s: ignored a second assignment", self.label)
                return
            self._assign(m)
        elif kind == "refused":
            self.controller_lost(f"the controller refused this worker: {m['reason']}",
                                 refused=True)
        elif self.steps is None:
            log.warning("unassigned worker: ignored %s", kind)
        elif kind == "build_group":
            self._build_group(m)
        elif kind == "leave_group":
            self._leave_group(m["group"])
        elif kind == "flush_replication":
            if self.replication is not None:
                self.replication.flush()
        elif kind == "step":
            self._step(m)

    def controller_lost(self, reason: str, refused: bool = False) -> None:
        """From the heartbeat thread: stop serving and exit (with an error
        if the controller refused this worker). Aborting every group wakes
        the main thread if an op holds it."""
        log.log(logging.ERROR if refused else logging.WARNING, "%s: %s; exiting", self.label,
                reason)
        self.refused = refused
        self.stop_reason = reason
        self.groups.abort_all()
        self.waker.wake()

    def close(self) -> None:
        if self.runner is not None and self.runner.decode_graphs is not None:
            log.info("%s: %d decode steps replayed CUDA graphs", self.name,
                     self.runner.decode_graphs.replays)
        self.heartbeat.stopping.set()
        self.heartbeat.join(timeout=5)
        if self.stop_reason is None and self.hidden is not None:
            self.hidden.drain()
        if self.replication is not None:
            self.replication.close()
        self.groups.close()
        with self.announcing:
            self.announcer.close()
        self.endpoint.close()
        self.waker.close()

    # Assignment: weights and KV pool first, communicators later --------------

    def _assign(self, m: dict) -> None:
        start = time.perf_counter()
        self.name = m["worker"]  # heartbeats start now: loading is watched too
        torch.set_num_threads(m["threads"])
        device = self.device or resolve_device(m["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and the default stream go there
        self.runner = load_runner(m, device, self.name)
        stage = self.runner.stage
        spec = stage.spec
        graphs = self.runner.decode_graphs
        if graphs is not None:
            log.info("%s: decode steps of up to %d sequences replay CUDA graphs (sizes %s, "
                     "captured in %.2f s)", self.name, graphs.sizes[-1], graphs.sizes,
                     graphs.capture_s)
        self.hidden = HiddenStates(self.groups, stage.cfg.hidden_size, stage.cfg.dtype, device,
                                   self._report_step)
        self.steps = StageSteps(self.name, spec, self.runner, self.groups, self.hidden,
                                m["max_model_len"], self._reply, self._report_step)
        self.transfer_bytes = m["replication_transfer_bytes"]
        self.replication_interval_s = m["replication_interval_s"]
        self.store_port, self.store_prefix = m["store_port"], m["store_prefix"]
        self.deadline_s = m["deadline_s"]
        self.heartbeat.interval_ms = max(1, int(m["heartbeat_s"] * 1000))
        load_s = time.perf_counter() - start
        log.info("%s: stage %d layers [%d, %d) loaded in %.2f s, %d KV blocks", self.name,
                 m["stage"], spec.first_layer, spec.end_layer, load_s, m["num_blocks"])
        self.endpoint.send("ready", worker=self.name, load_s=load_s, num_blocks=m["num_blocks"],
                           checkpoint=fingerprint.encode(fingerprint.fingerprint(m["model"])),
                           device=str(device), nccl=device.type == "cuda" and not
                           nccl.unavailable_reason())

    def _build_group(self, m: dict) -> None:
        group, members = m["group"], m["members"]
        if self.name not in members:
            log.warning("%s: asked to join %s, whose members %s exclude it", self.name, group, members)
            return
        if is_link(group) and self.replication is not None:
            self.replication.leave(group)  # a link's threads stop before it is rebuilt
        if self.groups.build(group, members, m["generation"], m["backend"]):
            self.hidden.drop_stale()

    def build_pipeline(self, m: dict) -> None:
        """From the heartbeat thread: start connecting a pipeline now, while
        the main thread may be in a forward pass. (Its sends still on their
        way on the old generation fail as it is retired; nobody waits.)"""
        if is_link(m["group"]) or self.steps is None or self.name not in m["members"]:
            log.warning("%s: ignored a build of %s on the heartbeat socket", self.label, m["group"])
            return
        self.groups.build(m["group"], m["members"], m["generation"], m["backend"])

    def _build_ended(self, build) -> None:
        """On the build's thread: a pipeline's build is reported at once. A
        link's waits for the main thread, which starts replicating on it
        first (a step may ask to copy blocks as soon as the link is ready)."""
        if not is_link(build.group) and not build.cancelled:
            with self.announcing:
                self._report_build(self.announcer, build)
        self.waker.wake()

    def _report_build(self, endpoint: WorkerEndpoint, build) -> None:
        if build.error is not None:
            log.info("%s: %s", self.name, build.error)
            endpoint.send("group_failed", worker=self.name, group=build.group,
                          generation=build.generation, message=str(build.error))
        else:
            endpoint.send("group_ready", worker=self.name, group=build.group,
                          generation=build.generation)

    def _finish_builds(self) -> None:
        """The builds that ended are current now; a link starts replicating.
        (On the main thread at every poll: also where sends on generations
        aborted from the heartbeat thread meanwhile are let go.)"""
        for build in self.groups.collect():
            if is_link(build.group):
                if build.error is None:
                    self._replication().joined(build.group, build.members, build.generation)
                self._report_build(self.endpoint, build)
        if self.hidden is not None:
            self.hidden.drop_stale()

    def _leave_group(self, group: str) -> None:
        """Stop using group for good; for a replication link, also wait until
        its threads are done (its blocks may become live blocks next)."""
        if self.replication is not None:
            self.replication.leave(group)
        self.groups.stop(group, "left")
        self.hidden.drop_stale()

    def _replication(self) -> WorkerReplication:
        if self.replication is None:
            self.replication = WorkerReplication(self.name, self.connect, self.groups.manager(),
                                                 self.runner.kv_caches, self.transfer_bytes,
                                                 self.replication_interval_s, self.deadline_s)
        return self.replication

    def abort_generation(self, group: str, generation: int) -> None:
        """From the heartbeat thread: give up on that generation of group, if
        it is the current one or the one being built, and wake the main thread
        if it is blocked in an op of it. A newer generation is left alone."""
        self.groups.abort(group, generation, "aborted by the controller")

    def _new_comm(self):
        from kevlarflow.comm.manager import CommManager

        def client():
            return store_client(self.controller_host, self.store_port, self.store_prefix,
                                max(30.0, self.deadline_s))
        # Its GPU, named: builds run on threads whose current device is cuda:0.
        device = self.runner.device.index if self.runner.device.type == "cuda" else None
        return CommManager(client(), self.name, deadline_s=self.deadline_s, connect_store=client,
                           device=device)

    # One micro-batch ----------------------------------------------------------

    def _step(self, m: dict) -> None:
        steps = [m]
        # Borrowed, it serves two pipelines: one forward pass for a step of
        # each, but for a priority step, whose turn is now.
        partner = None if m["priority"] else self.read_ahead.merge_partner(m["group"])
        if partner is not None:
            steps.append(partner)
            self.merged_steps += 1
            if self.merged_steps == 1:
                log.info("%s: merging the steps of %s and %s into one forward pass",
                         self.name, m["group"], partner["group"])
        self.steps.run(steps, self._written)

    def _written(self, messages: list[dict]) -> None:
        """The KV of these steps is in the caches: copy it out to the backup."""
        if self.replication is not None:
            for m in messages:
                self.replication.submit(m["replicate"] or [], m["step"])

    def _reply(self, **fields) -> None:
        self.endpoint.send("result", **fields)

    def _report_step(self, step: int, error: Exception) -> None:
        kind = "bad_step" if isinstance(error, BadStep) else "comm"
        log.warning("%s: step %d: %s: %s", self.name, step, kind, error)
        self.endpoint.send("error", step=step, kind=kind, message=str(error))


def main(controller: str, keys: JoinKeys, instance: int | None, stage: int | None,
         threads: int, parent_pid: int | None, device: str | None = None) -> NoReturn:
    logging.basicConfig(level=os.environ.get("KEVLARFLOW_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s")
    # A crash in native code (a signal, not an exception) still leaves every
    # thread's Python stack in the worker's log.
    faulthandler.enable()
    worker = Worker(controller, keys, instance, stage, threads, parent_pid, device=device)
    worker.run()  # closes everything the worker holds before it returns
    # The interpreter's own teardown (torch's modules and native state) would
    # add ~0.5 s of CPU per worker to every shutdown, on cores that
    # the deployment's other workers share: nothing is left for it to close.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if worker.refused else 0)
