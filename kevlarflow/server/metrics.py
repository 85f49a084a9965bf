"""Prometheus metrics of one app, in a registry of its own (two apps in one
process do not share counters). Request outcomes and latencies are counted by
the routes; engine state (queues, workers, failure events) is read at scrape
time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kevlarflow.ft.events import KINDS, failure_timings
from kevlarflow.server.state import is_deployment, retry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        engine = self.async_engine.engine
        st = engine.status() if is_deployment(engine) else None
        if st is None:
            scheduler = engine.scheduler
            queued = retry(lambda: (len(scheduler.running), len(scheduler.waiting)))
        else:
            queued = (sum(i.running for i in st.instances), sum(i.waiting for i in st.instances))
        running = GaugeMetricFamily("kevlarflow_requests_running",
                                    "Requests scheduled in the engine (all instances)")
        running.add_metric([], queued[0])
        waiting = GaugeMetricFamily("kevlarflow_requests_waiting",
                                    "Requests queued in the engine, not yet scheduled")
        waiting.add_metric([], queued[1])
        alive = GaugeMetricFamily("kevlarflow_engine_alive", "1 while the engine loop runs")
        alive.add_metric([], 1.0 if self.async_engine.alive else 0.0)
        yield from (running, waiting, alive)
        if st is None:
            return
        counts = engine.events.counts()
        faults = CounterMetricFamily("kevlarflow_fault_events",
                                     "Failure and recovery events by kind (the event log)",
                                     labels=["kind"])
        for kind in KINDS:
            faults.add_metric([kind], counts.get(kind, 0))
        yield faults
        failures = CounterMetricFamily("kevlarflow_worker_failures", "Worker failures detected")
        failures.add_metric([], counts.get("detected", 0))
        recoveries = CounterMetricFamily("kevlarflow_recoveries",
                                         "Instances rerouted to a borrowed worker or "
                                         "moved back to a replacement")
        recoveries.add_metric([], counts.get("rerouted", 0) + counts.get("rejoined", 0))
        yield failures
        yield recoveries
        serving = GaugeMetricFamily("kevlarflow_instance_serving", "1 while an instance serves",
                                    labels=["instance"])
        for inst in st.instances:
            serving.add_metric([str(inst.index)], 1.0 if inst.serving else 0.0)
        live = GaugeMetricFamily("kevlarflow_worker_live", "1 while a worker slot is live",
                                 labels=["worker"])
        for w in st.workers:
            live.add_metric([w.name], 1.0 if w.live else 0.0)
        yield serving
        yield live
        yield from _recovery_metrics(st)


def _recovery_metrics(st):
    """MTTR of the last failure and what replication moved and saved."""
    last_mttr = GaugeMetricFamily("kevlarflow_last_mttr_seconds",
                                  "MTTR of the last failure: from the fault (an injected "
                                  "one; else its detection) until its instance completed a "
                                  "step")
    mttrs = [f["mttr_s"] for f in failure_timings([(e.kind, e.time, e.instance, e.worker)
                                                   for e in st.events]) if f["mttr_s"] is not None]
    if mttrs:
        last_mttr.add_metric([], mttrs[-1])
    yield last_mttr
    for key, name, text in (
            ("bytes_replicated", "kevlarflow_replicated_bytes", "KV bytes acknowledged by backups"),
            ("tokens_recomputed", "kevlarflow_recomputed_tokens",
             "Tokens of KV recomputed after failures and moves"),
            ("tokens_restored", "kevlarflow_restored_tokens",
             "Tokens of KV kept through failures and moves (survivors and replicas)")):
        counter = CounterMetricFamily(name, text)
        counter.add_metric([], st.stats[key])
        yield counter
    lag = GaugeMetricFamily("kevlarflow_replication_lag_tokens",
                            "Largest replication lag over running requests")
    lag.add_metric([], max(st.lag_tokens, default=0))
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
