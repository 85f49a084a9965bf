"""What /health and /status report: a deployment's typed snapshot
(Controller.status()), or the in-process engine's queues."""
from __future__ import annotations

import time

from kevlarflow.ft.phases import Phase

LATE_MIN_S = 0.3  # heartbeats later than this (or three intervals) mark a worker silent


def retry(read, attempts: int = 20):
    """read() again if it raced with the engine thread (a container that
    changed size while it was copied)."""
    for _ in range(attempts - 1):
        try:
            return read()
        except (RuntimeError, KeyError, IndexError):
            time.sleep(0.001)
    return read()


def is_deployment(engine) -> bool:
    from kevlarflow.deploy.controller import Controller

    return isinstance(engine, Controller)


def health(async_engine) -> tuple[bool, dict]:
    """(healthy, body). The in-process engine is healthy while its loop runs.
    A deployment is unhealthy (503) while some request cannot be served: an
    instance cannot serve without a new worker, or a worker has missed its
    heartbeats (a hung worker stalls its pipeline long before the hang
    deadline declares it failed). An instance that pauses to rebuild its
    pipeline or to move back to its own workers, or runs through a borrowed
    worker, serves every request it has: 200, with status "degraded" and the
    reason, until the replacement has joined and the move is done."""
    if not async_engine.alive:
        return False, {"status": "unhealthy", "reason": "the engine loop is not running",
                       "serving": False}
    engine = async_engine.engine
    if not is_deployment(engine):
        return True, {"status": "ok"}
    st = engine.status()
    late_s = max(3 * st.heartbeat_s, LATE_MIN_S)
    silent = sorted(w.name for w in st.workers if w.silent_s is not None and w.silent_s > late_s)
    down = [i.index for i in st.instances if Phase(i.phase).needs_worker]
    pausing = {i.index: i.phase for i in st.instances
               if not Phase(i.phase).needs_worker and not i.serving}
    borrowing = {i.index: i.borrowed for i in st.instances if i.borrowed}
    dead = sorted(w.name for w in st.workers if not w.live)
    reasons = []
    if silent:
        reasons.append(f"worker(s) {silent} missed their heartbeats")
    if down:
        reasons.append(f"instance(s) {down} not serving")
    if pausing:
        reasons.append("instance(s) " + ", ".join(f"{i} {phase}" for i, phase in pausing.items()))
    if dead:
        reasons.append(f"worker(s) {dead} failed, replacement pending")
    if borrowing:
        reasons.append("instance(s) " + ", ".join(f"{i} borrowing {w}" for i, w in borrowing.items()))
    if silent or down:
        return False, {"status": "unhealthy", "reason": "; ".join(reasons),
                       "serving": len(down) < len(st.instances), "instances_down": down,
                       "workers_silent": silent, "workers_down": dead}
    if reasons:
        return True, {"status": "degraded", "reason": "; ".join(reasons), "workers_down": dead}
    return True, {"status": "ok"}


def _lag_summary(lags: list[int]) -> dict:
    return {"sequences": len(lags), "max_tokens": max(lags, default=0),
            "mean_tokens": (sum(lags) / len(lags)) if lags else 0.0}


def status(async_engine, model_name: str) -> dict:
    engine = async_engine.engine
    ok, _ = health(async_engine)
    body = {"model": model_name, "healthy": ok, "engine_alive": async_engine.alive,
            "max_model_len": engine.max_model_len}
    if not is_deployment(engine):
        scheduler = engine.scheduler
        body.update(engine="in-process", running=retry(lambda: len(scheduler.running)),
                    waiting=retry(lambda: len(scheduler.waiting)))
        return body
    st = engine.status()
    body.update(
        engine="deployment", num_instances=st.num_instances, pp_size=st.pp_size,
        recovery=st.recovery,
        workers={w.name: {"instance": w.instance, "stage": w.stage, "live": w.live,
                          "state": w.state, "pid": w.pid, "replacements": w.replacements,
                          "blocks_used": w.blocks_used}
                 for w in st.workers},
        instances=[{"index": i.index, "phase": i.phase, "reason": i.reason, "serving": i.serving,
                    "steps": i.steps,
                    "workers": i.workers, "home": i.home, "borrowed": i.borrowed,
                    "requests": i.requests} for i in st.instances],
        replication={"enabled": st.replication_enabled, "stats": st.stats,
                     "lag": _lag_summary(st.lag_tokens),
                     "replica_blocks_used": st.replica_blocks_used},
        recent_events=[{"kind": e.kind, "time": e.time, "worker": e.worker,
                        "instance": e.instance, "detail": e.detail} for e in st.recent_events])
    return body
