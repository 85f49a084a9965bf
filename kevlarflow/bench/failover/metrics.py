"""The failover benchmark's metrics, from run records (docs/failover-benchmark.md
defines each one). A run's metrics are computed from what its requests saw;
repeats are summarized as median, min and max; ratios compare medians."""
from __future__ import annotations

import statistics

from kevlarflow.ft.events import failure_timings

# Summaries of several runs, and the paper's ratios, use these keys.
RATIO_METRICS = ("mttr_s", "avg_latency_s", "p99_latency_s", "avg_ttft_s", "p99_ttft_s")
SLO_FACTOR = 5.0  # default SLOs: this many times the fault-free baseline's median TTFT and TPOT
FLOOR_WINDOW_S = 5.0  # the recovering requests' step time is taken over this much before a fault


def percentile(values: list[float], q: float) -> float | None:
    """The value at index min(n - 1, int(q * n)) of the sorted values."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def completed(run: dict) -> list[dict]:
    """Requests that produced every token they asked for."""
    return [r for r in run["requests"] if len(r["token_times_s"]) == r["output_tokens"]]


def ttft(r: dict) -> float:
    return r["token_times_s"][0] - r["arrival_s"]


def latency(r: dict) -> float:
    return r["token_times_s"][-1] - r["arrival_s"]


def tpot(r: dict) -> float | None:
    n = len(r["token_times_s"])
    return (latency(r) - ttft(r)) / (n - 1) if n > 1 else None


def slos(baseline_run: dict) -> dict:
    """Default goodput SLOs from a fault-free run of the plain system."""
    done = completed(baseline_run)
    tpots = [t for t in map(tpot, done) if t is not None]
    # None: no bound (the baseline gave nothing to derive it from).
    return dict(ttft_s=SLO_FACTOR * statistics.median(map(ttft, done)) if done else None,
                tpot_s=SLO_FACTOR * statistics.median(tpots) if tpots else None)


def within(value: float | None, bound: float | None) -> bool:
    return value is None or bound is None or value <= bound


def step_floor(run: dict, instance: int, at_s: float) -> float | None:
    """The floor of a recovery: one forward step of the recovering requests,
    taken as the median gap between two tokens of a request of that instance
    in the FLOOR_WINDOW_S before the fault (a decode step through its whole
    pipeline); None without such tokens."""
    gaps = [b - a for r in run["requests"] if r["instance"] == instance
            for a, b in zip(r["token_times_s"], r["token_times_s"][1:])
            if at_s - FLOOR_WINDOW_S <= a and b < at_s]
    return statistics.median(gaps) if gaps else None


def recovery_times(run: dict) -> dict:
    """Per failure in the run, seconds from the fault to its detection, to the
    failed instance's communicator being up again, to its first completed
    forward step (MTTR), and the recovery overhead (MTTR minus the floor of
    step_floor); averaged over the run's failures."""
    timings = failure_timings([(e["kind"], e["t_s"], e["instance"], e.get("worker"))
                               for e in run["events"]])
    for t in timings:
        floor = step_floor(run, t["instance"], t["at"])
        t["recovery_overhead_s"] = None if t["mttr_s"] is None or floor is None \
            else t["mttr_s"] - floor
    out = {}
    for key in ("detect_s", "resumed_s", "mttr_s", "recovery_overhead_s"):
        times = [t[key] for t in timings]
        out[key] = mean(times) if times and None not in times else None
    return out


def run_metrics(run: dict, slo: dict) -> dict:
    done = completed(run)
    tpots = [t for t in map(tpot, done) if t is not None]
    tokens = sum(len(r["token_times_s"]) for r in run["requests"])
    latencies, ttfts = list(map(latency, done)), list(map(ttft, done))
    good = [r for r in done if within(ttft(r), slo["ttft_s"]) and within(tpot(r), slo["tpot_s"])]
    return dict(
        **recovery_times(run),
        avg_latency_s=mean(latencies), p99_latency_s=percentile(latencies, 0.99),
        avg_ttft_s=mean(ttfts), p99_ttft_s=percentile(ttfts, 0.99),
        mean_tpot_s=mean(tpots),
        requests=len(run["requests"]), requests_failed=len(run["requests"]) - len(done),
        throughput_tok_s=tokens / run["elapsed_s"], goodput_rps=len(good) / run["elapsed_s"],
        tokens_recomputed=run["tokens_recomputed"], tokens_restored=run["tokens_restored"],
        bytes_replicated=run["bytes_replicated"],
        **{f"replication_{k}": (run.get("replication") or {}).get(k) for k in REPLICATION_WORK},
        worker_cpu_s=run.get("worker_cpu_s"), controller_cpu_s=run.get("controller_cpu_s"))


# Replication's work in a run (Replication.totals), from the workers' heartbeats.
REPLICATION_WORK = ("bytes_sent", "pack_s", "send_s", "unpack_s")


def summarize(per_run: list[dict]) -> dict:
    """{metric: {"median", "min", "max"}} over repeats; None where a metric
    does not apply (e.g. MTTR without a failure)."""
    out = {}
    for key in per_run[0]:
        values = [m[key] for m in per_run if m[key] is not None]
        out[key] = dict(median=statistics.median(values), min=min(values), max=max(values)) \
            if values else None
    return out


def median_of(summary: dict, key: str) -> float | None:
    return summary[key]["median"] if summary.get(key) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paper_ratios(metrics: dict, baseline: str = "restart") -> dict:
    """restart / mode under failure (higher is better for the mode), and each
    mode's fault-free cost against the fault-free baseline (mode / baseline - 1)."""
    base = metrics.get(baseline)
    out = {}
    for mode, m in metrics.items():
        if mode == baseline or not base:
            continue
        under_failure = {k: ratio(median_of(base["failure"], k), median_of(m["failure"], k))
                         for k in RATIO_METRICS} if "failure" in m and "failure" in base else {}
        overhead = {}
        if "fault_free" in m and "fault_free" in base:
            for k in ("avg_latency_s", "p99_latency_s", "mean_tpot_s"):
                r = ratio(median_of(m["fault_free"], k), median_of(base["fault_free"], k))
                overhead[k] = None if r is None else r - 1
        out[mode] = dict(under_failure=under_failure, fault_free_overhead=overhead)
    return out


# (name, what is compared, bound, higher is better, settings it applies to)
TARGETS = (
    ("mttr_vs_restart", "restart MTTR / kevlarflow MTTR", 20.0, True, "all"),
    ("recovery_overhead", "kevlarflow recovery overhead (MTTR - one step), s", 0.05, False,
     "same-machine"),
    ("p99_ttft_vs_restart", "restart p99 TTFT / kevlarflow's, under failure", 10.0, True,
     "new-node"),
    ("avg_latency_vs_restart", "restart avg latency / kevlarflow's, under failure", 1.5, True,
     "new-node"),
    ("p99_ttft_failure_vs_fault_free", "kevlarflow p99 TTFT, failure / fault-free", 2.0, False,
     "same-machine"),
    ("p99_latency_failure_vs_fault_free", "kevlarflow p99 latency, failure / fault-free", 1.5,
     False, "same-machine"),
    ("fault_free_overhead", "kevlarflow fault-free avg latency / restart's - 1, upper end of "
     "the 95% interval", 0.01, False, "all"),
    ("requests_failed", "requests failed in any KevlarFlow run", 0, False, "all"),
)


def targets(metrics: dict, ratios: dict, paired: dict | None = None,
            new_node: bool = False) -> dict:
    """The targets of the setting (a restart on this machine, or on a new
    node) on the `kevlarflow` mode, with the value reached. paired: the
    fault-free cost in pairs (paired.paired_overhead); without it the
    fault-free medians' ratio stands in."""
    kf = metrics.get("kevlarflow", {})
    values = {}
    if "kevlarflow" in ratios:
        under = ratios["kevlarflow"]["under_failure"]
        values["mttr_vs_restart"] = under.get("mttr_s")
        values["p99_ttft_vs_restart"] = under.get("p99_ttft_s")
        values["avg_latency_vs_restart"] = under.get("avg_latency_s")
        values["fault_free_overhead"] = ratios["kevlarflow"]["fault_free_overhead"].get(
            "avg_latency_s")
    cost = (paired or {}).get("kevlarflow", {}).get("avg_latency_s")
    if cost:
        values["fault_free_overhead"] = cost["ci95"][1]
    values["recovery_overhead"] = median_of(kf.get("failure") or {}, "recovery_overhead_s")
    if "failure" in kf and "fault_free" in kf:
        for name, key in (("p99_ttft_failure_vs_fault_free", "p99_ttft_s"),
                          ("p99_latency_failure_vs_fault_free", "p99_latency_s")):
            values[name] = ratio(median_of(kf["failure"], key), median_of(kf["fault_free"], key))
    failed = [s["requests_failed"]["max"] for mode, m in metrics.items()
              if mode.startswith("kevlarflow") for s in m.values() if s.get("requests_failed")]
    if failed:
        values["requests_failed"] = max(failed)
    out = {}
    setting = "new-node" if new_node else "same-machine"
    for name, what, bound, higher, applies in TARGETS:
        if applies not in ("all", setting):
            continue
        value = values.get(name)
        met = None if value is None else (value >= bound if higher else value <= bound)
        out[name] = dict(what=what, bound=bound, value=value, met=met, higher_is_better=higher)
    return out
