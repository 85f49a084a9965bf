"""What /health and /status report, read from the engine without locking.

The engine is stepped on its own thread (a deployment even when idle: its
health checks run there), so every read here copies what it needs, and a copy
that races with the engine thread (a set or dict that changed size while it
was copied) is simply taken again."""
from __future__ import annotations

import time

LATE_MIN_S = 0.3  # heartbeats later than this (or three intervals) mark a worker silent


def retry(read, attempts: int = 20):
    for _ in range(attempts - 1):
        try:
            return read()
        except (RuntimeError, KeyError, IndexError):  # changed under us: read again
            time.sleep(0.001)
    return read()


def is_deployment(engine) -> bool:
    return hasattr(engine, "instances")


def health(async_engine) -> tuple[bool, dict]:
    """(healthy, body). The in-process engine is healthy while its loop runs.
    A deployment is unhealthy (503) while some request cannot be served: an
    instance is not serving, or a worker has missed its heartbeats (a hung
    worker stalls its pipeline long before the hang deadline declares it
    failed). Rerouted through a borrowed worker, every request is served:
    200, with status "degraded" and the reason, until the replacement joins."""
    if not async_engine.alive:
        return False, {"status": "unhealthy", "reason": "the engine loop is not running",
                       "serving": False}
    engine = async_engine.engine
    if not is_deployment(engine):
        return True, {"status": "ok"}
    late_s = max(3 * engine.config.heartbeat_s, LATE_MIN_S)

    def read():
        ready = set(engine.ready)
        now = time.monotonic()
        silent = sorted(w for w, t in dict(engine.health.last_seen).items() if now - t > late_s)
        instances = [(inst.index, bool(inst.serving), list(inst.workers), list(inst.home))
                     for inst in list(engine.instances)]
        return ready, silent, instances

    ready, silent, instances = retry(read)
    down = [i for i, serving, _, _ in instances if not serving]
    borrowing = {i: [w for w in workers if w not in home]
                 for i, _, workers, home in instances if workers != home}
    dead = sorted(w for _, _, _, home in instances for w in home if w not in ready)
    reasons = []
    if silent:
        reasons.append(f"worker(s) {silent} missed their heartbeats")
    if down:
        reasons.append(f"instance(s) {down} not serving")
    if dead:
        reasons.append(f"worker(s) {dead} failed, replacement pending")
    if borrowing:
        reasons.append("instance(s) " + ", ".join(f"{i} borrowing {w}" for i, w in borrowing.items()))
    if silent or down:
        return False, {"status": "unhealthy", "reason": "; ".join(reasons),
                       "serving": len(down) < len(instances), "instances_down": down,
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

    def read():
        ready = set(engine.ready)
        pids = dict(engine.pid_of)
        replacing = dict(engine.replacing)
        workers = {name: {"instance": i, "stage": s, "live": name in ready, "pid": pids.get(name),
                          "replacements": replacing.get(name, 0)}
                   for name, (i, s) in dict(engine.slot_of).items()}
        instances = []
        for inst in list(engine.instances):
            current, home = list(inst.workers), list(inst.home)
            instances.append({"index": inst.index, "serving": bool(inst.serving),
                              "workers": current, "home": home,
                              "borrowed": [w for w in current if w not in home],
                              "requests": len(inst.sequences)})
        return workers, instances

    workers, instances = retry(read)
    replication = engine.replication
    lags = retry(lambda: replication.lag())
    events = retry(lambda: list(engine.events.events)[-20:])
    body.update(engine="deployment", num_instances=engine.config.num_instances,
                pp_size=engine.config.pp_size, recovery=engine.config.recovery,
                workers=workers, instances=instances,
                replication={"enabled": replication.enabled, "stats": dict(replication.stats),
                             "lag": _lag_summary(lags)},
                recent_events=[{"kind": e.kind, "time": e.time, "worker": e.worker,
                                "instance": e.instance, "detail": e.detail} for e in events])
    return body
