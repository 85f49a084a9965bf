"""Fault-free cost, measured in interleaved pairs: every mode keeps one live
deployment; in each round every mode serves the same trace (a new trace,
same rate and lengths, each round), in an order that rotates from round to
round. A round gives one ratio per mode against the baseline, and drift on
a shared machine hits both members of a pair alike. The estimate is the
mean of those ratios with a bootstrap 95% interval over the rounds."""
from __future__ import annotations

import random
import statistics

from kevlarflow.bench.failover import metrics as m
from kevlarflow.bench.failover.runner import Deployment, serve, submit
from kevlarflow.bench.trace import Request

# Latency, and where a cost would come from: the CPU time of the workers
# (replication packs, sends and unpacks on threads of theirs) and of the
# controller (it plans the transfers).
PAIRED_METRICS = ("avg_latency_s", "p99_latency_s", "mean_tpot_s", "worker_cpu_s",
                  "controller_cpu_s")
BOOTSTRAP_SAMPLES = 10_000
WARMUP_REQUESTS = 4


def run_rounds(deployment: Deployment, modes: list[str], traces: list[list[Request]],
               label: str = "fault-free") -> dict[str, list[dict]]:
    """{mode: [run record per round]}: round r serves traces[r] on every
    mode's live deployment, starting with mode r mod len(modes)."""
    llms = {}
    try:
        for mode in modes:
            llms[mode] = deployment.start(mode)
            warm_up(llms[mode].engine, traces[0][:WARMUP_REQUESTS])
        runs = {mode: [] for mode in modes}
        for r, trace in enumerate(traces):
            shift = r % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                run = serve(llms[mode].engine, trace, [],
                            f"[{label} round {r + 1}/{len(traces)}] {mode}")
                runs[mode].append(run)
                print(f"[{label} round {r + 1}/{len(traces)}] {mode}: "
                      f"{len(m.completed(run))}/{len(trace)} requests in "
                      f"{run['elapsed_s']:.1f} s", flush=True)
        return runs
    finally:
        for llm in llms.values():
            llm.shutdown()


def warm_up(engine, requests: list[Request]) -> None:
    """First requests pay one-time costs (allocator, code paths): not in a round."""
    for req in requests:
        submit(engine, req)
    while engine.has_unfinished():
        engine.step()


def bootstrap_mean_ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of values."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    return means[int(0.025 * BOOTSTRAP_SAMPLES)], means[int(0.975 * BOOTSTRAP_SAMPLES) - 1]


def paired_overhead(per_round: dict[str, list[dict]], baseline: str) -> dict:
    """{mode: {metric: {"ratios", "mean", "median", "ci95"}}}, each a
    fraction (mode / baseline - 1), for every mode but the baseline; per_round
    is {mode: [metrics of each round]}."""
    out = {}
    for mode, rounds in per_round.items():
        if mode == baseline:
            continue
        out[mode] = {}
        for key in PAIRED_METRICS:
            ratios = [a[key] / b[key] - 1 for a, b in zip(rounds, per_round[baseline])
                      if a[key] is not None and b[key]]
            if not ratios:
                out[mode][key] = None
                continue
            low, high = bootstrap_mean_ci(ratios)
            out[mode][key] = dict(ratios=ratios, mean=statistics.fmean(ratios),
                                  median=statistics.median(ratios), ci95=[low, high])
    return out
