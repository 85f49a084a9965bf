"""The controller's side of its workers' lives: registration and assignment,
the messages workers send, and the checks that notice a failure (a process
that exited, a heartbeat that stopped, a replacement that never registered).
What follows a failure is recovery's business (ft.recovery)."""
from __future__ import annotations

import json
import logging
import os
import signal
import time

from kevlarflow.deploy.workers import WorkerState
from kevlarflow.engine.outputs import RequestOutput
from kevlarflow.model import fingerprint
from kevlarflow.replication import is_link

log = logging.getLogger("kevlarflow.controller")

REGISTER_TIMEOUT_S = 120.0  # for a started process to register (importing torch, on a busy host)


class Membership:
    def __init__(self, controller):
        self.c = controller  # Controller: its public attributes and methods only
        self.started = False

    # Processes -------------------------------------------------------------------

    def discard(self, name: str) -> None:
        """No message of the slot's process is trusted again; a process that
        still runs (hung, or healthy in the restart baseline) is killed so that
        it cannot wake up later into a deployment that moved on."""
        c = self.c
        record = c.workers[name]
        c.health.forget(name)
        c.workers.vacate(record)
        if c.launcher:
            c.launcher.kill((record.instance, record.stage))

    def spawn(self, name: str) -> bool:
        """A new process for the slot; False when this controller starts none."""
        c = self.c
        if not c.launcher:
            log.warning("%s: waiting for a `kevlarflow worker` to take its slot", name)
            return False
        record = c.workers[name]
        self.discard(name)
        c.launcher.spawn(record.instance, record.stage)
        record.enter(WorkerState.STARTING)
        return True

    def inject_fault(self, instance: int, stage: int, kind: str) -> None:
        signals = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}
        if kind not in signals:
            raise ValueError(f"kind must be 'kill' or 'hang', got {kind!r}")
        c = self.c
        if not (0 <= instance < len(c.instances) and 0 <= stage < c.config.pp_size):
            raise ValueError(f"no worker at instance {instance}, stage {stage}")
        name = c.instances[instance].home[stage]
        proc = c.launcher.procs.get((instance, stage)) if c.launcher else None
        if proc is None or proc.poll() is not None:
            raise ValueError(f"{name} has no live process started by this controller")
        c.events.record("failed", worker=name, instance=instance, detail=kind)
        os.kill(proc.pid, signals[kind])

    # Failures --------------------------------------------------------------------

    def check(self) -> None:
        """Failures seen by the launcher (an exit), by the heartbeat deadline
        and by the registration deadline; then recovery's own deadlines."""
        c = self.c
        if c.launcher:
            for (i, s), code in c.launcher.exited().items():
                record = c.workers[f"w{i}.{s}"]
                if not self.started:  # a worker that cannot even start: fail fast
                    from kevlarflow.deploy.controller import DeploymentError
                    raise DeploymentError(f"worker {record.name} exited with code {code} while "
                                          "the deployment was starting (its log is above)")
                if record.live:
                    c.recovery.worker_lost(record.name, f"process exited with code {code}")
                elif record.state is WorkerState.STARTING:
                    c.recovery.replacement_died(record.name, f"exited with code {code}")
                else:
                    c.launcher.kill((i, s))  # reaped: nothing else refers to it
        for name, silent_s in c.health.silent():
            c.recovery.worker_lost(name, f"no heartbeat for {silent_s:.2f} s")
        now = time.monotonic()
        for record in c.workers:
            if record.state is not WorkerState.STARTING or not self.started:
                continue
            age = now - record.since
            if age > REGISTER_TIMEOUT_S:
                c.recovery.replacement_died(record.name,
                                            f"did not register within {REGISTER_TIMEOUT_S:.0f} s")
            elif age > c.health.loading_timeout_s and c.launcher \
                    and c.launcher.stopped((record.instance, record.stage)):
                c.recovery.replacement_died(record.name, "stopped before it registered")
        c.recovery.tick()

    def handle(self, received) -> list[RequestOutput]:
        if received is None:
            return []
        c = self.c
        peer, m = received
        kind = m["type"]
        if kind == "register":
            self._register(peer, m)
            return []
        if kind == "heartbeat":
            record = c.workers.records.get(m["worker"])
            if record is not None and record.live:
                record.heartbeat_peer = peer
                c.health.beat(record.name)
                if m["replication"] is not None:
                    c.replication.count(record.name, record.pid, m["replication"])
            return []
        if kind == "replicated":  # from a backup's receiver thread
            record = c.workers.records.get(m["worker"])
            if record is not None and record.ready:
                c.replication.acknowledged(m)
            return []
        if kind in ("group_ready", "group_failed"):  # from a build's thread
            record = c.workers.records.get(m["worker"])
            if record is not None and record.ready:
                self._group_message(record.name, m)
            return []
        record = c.workers.by_peer(peer)
        if record is None:
            # Late messages of a worker given up on (a restart discards a
            # whole instance) are expected; anything else has no business here.
            log.info("dropped %s from a peer that is no worker (any more)", kind)
            return []
        name = record.name
        if kind == "ready":
            differs = self._other_checkpoint(m["checkpoint"])
            if differs:
                reason = "it loaded another checkpoint than the controller's: " + "; ".join(differs)
                log.error("%s (pid %d on %s): %s", name, record.pid, record.host, reason)
                c.send(name, "refused", reason=reason)
                c.recovery.worker_lost(name, "refused: " + reason)
                return []
            log.info("%s: loaded on %s in %.2f s", name, m["device"], m["load_s"])
            record.device, record.nccl = m["device"], m["nccl"]
            record.enter(WorkerState.READY)
            c.health.loaded(name)
            c.worker_loaded(name)
        elif kind == "result":
            return c.on_result(name, m)
        elif kind == "error":
            self._error(name, m)
        return []

    def _other_checkpoint(self, encoded: str) -> list[str]:
        """How the checkpoint a worker loaded differs from the controller's."""
        try:
            theirs = json.loads(encoded)
        except ValueError:
            return ["its fingerprint is not JSON"]
        if not isinstance(theirs, dict):
            return ["its fingerprint is not a map"]
        return fingerprint.differences(self.c.checkpoint, theirs)

    def _register(self, peer: bytes, m: dict) -> None:
        c = self.c
        wanted = (m["instance"], m["stage"])
        record = c.workers.free_slot(wanted)
        if record is None:
            log.warning("worker pid %d on %s asked for slot %s: none free", m["pid"], m["host"],
                        wanted)
            c.endpoint.send(peer, "shutdown")
            return
        c.workers.register(record, peer, m["pid"], m["host"])
        c.health.watch(record.name, loading=True)
        log.info("%s: pid %d on %s", record.name, m["pid"], m["host"])
        cfg, s = c.config, record.stage
        c.send(record.name, "assign", worker=record.name, instance=record.instance, stage=s,
               num_stages=cfg.pp_size, model=c.model, dtype=cfg.dtype,
               block_size=cfg.block_size, num_blocks=c.stage_blocks[s],
               max_model_len=c.max_model_len, store_port=c.hosted_store.port,
               store_prefix=c.hosted_store.prefix,
               deadline_s=float(cfg.comm_deadline_s), attention_backend=cfg.attention_backend,
               threads=cfg.worker_threads, heartbeat_s=float(cfg.heartbeat_s),
               replica_blocks=c.replication.replica_blocks[s],
               replication_transfer_bytes=cfg.replication_transfer_bytes,
               replication_interval_s=float(cfg.replication_interval_s),
               device=c.slot_devices[record.instance * cfg.pp_size + s],
               max_num_seqs=cfg.max_num_seqs, enforce_eager=cfg.enforce_eager)

    def _group_message(self, name: str, m: dict) -> None:
        c = self.c
        group, generation = m["group"], m["generation"]
        if is_link(group):
            if m["type"] == "group_ready":
                c.replication.group_ready(name, group, generation)
            else:
                log.info("%s: link %s generation %d failed: %s", name, group, generation,
                         m["message"])
                c.replication.link_failed(group, generation)
            return
        inst = next((i for i in c.instances if i.group == group), None)
        if inst is None:
            return
        if m["type"] == "group_ready":
            c.recovery.group_ready(inst, generation, name)
        else:
            c.recovery.group_failed(inst, generation, name, m["message"])

    def _error(self, name: str, m: dict) -> None:
        c = self.c
        inst = c.instance_of_step(m["step"])
        if m["step"] is not None and inst is None:
            return  # about a step given up on already
        log.warning("%s: %s: %s", name, m["kind"], m["message"])
        if m["kind"] == "comm" and inst is not None:
            c.recovery.comm_error(inst, name, m["message"])
        else:
            c.on_bad_step(name, m["step"], m["message"])
