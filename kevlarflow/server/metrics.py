"""Prometheus metrics of one app, in a registry of its own (two apps in one
process do not share counters). Request outcomes and latencies are counted by
the routes; engine state (queues, workers, failure events) is read at scrape
time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kevlarflow.ft.events import KINDS
from kevlarflow.server.state import is_deployment, retry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    def __init__(self, async_engine):
        self.async_engine = async_engine

    def _schedulers(self, engine):
        if is_deployment(engine):
            return [inst.scheduler for inst in list(engine.instances)]
        return [engine.scheduler]

    def collect(self):
        engine = self.async_engine.engine
        schedulers = retry(lambda: self._schedulers(engine))
        running = GaugeMetricFamily("kevlarflow_requests_running",
                                    "Requests scheduled in the engine (all instances)")
        running.add_metric([], retry(lambda: sum(len(s.running) for s in schedulers)))
        waiting = GaugeMetricFamily("kevlarflow_requests_waiting",
                                    "Requests queued in the engine, not yet scheduled")
        waiting.add_metric([], retry(lambda: sum(len(s.waiting) for s in schedulers)))
        alive = GaugeMetricFamily("kevlarflow_engine_alive", "1 while the engine loop runs")
        alive.add_metric([], 1.0 if self.async_engine.alive else 0.0)
        yield from (running, waiting, alive)
        if not is_deployment(engine):
            return
        events = retry(lambda: list(engine.events.events))
        faults = CounterMetricFamily("kevlarflow_fault_events",
                                     "Failure and recovery events by kind (the event log)",
                                     labels=["kind"])
        for kind in KINDS:
            faults.add_metric([kind], sum(1 for e in events if e.kind == kind))
        yield faults
        failures = CounterMetricFamily("kevlarflow_worker_failures", "Worker failures detected")
        failures.add_metric([], sum(1 for e in events if e.kind == "detected"))
        recoveries = CounterMetricFamily("kevlarflow_recoveries",
                                         "Instances rerouted to a borrowed worker or "
                                         "moved back to a replacement")
        recoveries.add_metric([], sum(1 for e in events if e.kind in ("rerouted", "rejoined")))
        yield failures
        yield recoveries
        serving = GaugeMetricFamily("kevlarflow_instance_serving", "1 while an instance serves",
                                    labels=["instance"])
        for inst in retry(lambda: list(engine.instances)):
            serving.add_metric([str(inst.index)], 1.0 if inst.serving else 0.0)
        ready = retry(lambda: set(engine.ready))
        live = GaugeMetricFamily("kevlarflow_worker_live", "1 while a worker slot is live",
                                 labels=["worker"])
        for name in retry(lambda: list(engine.slot_of)):
            live.add_metric([name], 1.0 if name in ready else 0.0)
        yield serving
        yield live
        yield from _recovery_metrics(engine, events)


def _recovery_metrics(engine, events):
    """MTTR of the last failure and what replication moved and saved."""
    last_mttr = GaugeMetricFamily("kevlarflow_last_mttr_seconds",
                                  "From the last failure until its instance completed a step")
    stepped = [e for e in events if e.kind == "first_step_after_failure"]
    if stepped:
        last = stepped[-1]
        # From the injected fault if there was one, else from its detection.
        before = [e for e in events if e.instance == last.instance and e.time <= last.time]
        start = next((e.time for e in reversed(before) if e.kind == "failed"), None) or \
            next((e.time for e in reversed(before) if e.kind == "detected"), None)
        if start is not None:
            last_mttr.add_metric([], last.time - start)
    yield last_mttr
    stats = retry(lambda: dict(engine.replication.stats))
    for key, name, text in (
            ("bytes_replicated", "kevlarflow_replicated_bytes", "KV bytes acknowledged by backups"),
            ("tokens_recomputed", "kevlarflow_recomputed_tokens",
             "Tokens of KV recomputed after failures and moves"),
            ("tokens_restored", "kevlarflow_restored_tokens",
             "Tokens of KV kept through failures and moves (survivors and replicas)")):
        counter = CounterMetricFamily(name, text)
        counter.add_metric([], stats[key])
        yield counter
    lags = retry(engine.replication.lag)
    lag = GaugeMetricFamily("kevlarflow_replication_lag_tokens",
                            "Largest replication lag over running requests")
    lag.add_metric([], max(lags, default=0))
    yield lag


class ServerMetrics:
    def __init__(self, async_engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("kevlarflow_requests", "HTTP API requests by endpoint and outcome "
                                "(ok, invalid, unauthorized, error, aborted)",
                                ["endpoint", "outcome"], registry=self.registry)
        self.ttft = Histogram("kevlarflow_time_to_first_token_seconds",
                              "Time to first token of each choice", buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.e2e = Histogram("kevlarflow_e2e_request_latency_seconds",
                             "Arrival to last token of each choice", buckets=LATENCY_BUCKETS,
                             registry=self.registry)
        self.tpot = Histogram("kevlarflow_time_per_output_token_seconds",
                              "Mean time per output token after the first, of each choice",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("kevlarflow_http_requests_in_progress",
                                 "Generation requests being answered", registry=self.registry)
        self.prompt_tokens = Counter("kevlarflow_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=self.registry)
        self.generation_tokens = Counter("kevlarflow_generation_tokens", "Tokens generated",
                                         registry=self.registry)
        self.registry.register(_EngineCollector(async_engine))

    def finished(self, output) -> None:
        m = output.metrics
        if m.ttft is not None:
            self.ttft.observe(max(0.0, m.ttft))
        if m.latency is not None:
            self.e2e.observe(max(0.0, m.latency))
        if m.latency is not None and m.ttft is not None and len(output.token_ids) > 1:
            self.tpot.observe(max(0.0, m.latency - m.ttft) / (len(output.token_ids) - 1))
        self.generation_tokens.inc(len(output.token_ids))

    def render(self) -> bytes:
        return generate_latest(self.registry)
