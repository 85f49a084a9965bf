"""Replay a real failover benchmark run (`kevlarflow bench failover --json`,
schema kevlarflow.failover/1) in the simulator: the same deployment, trace
and failures; compare simulated and measured figures, mode by mode."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from kevlarflow.bench.sim.costs import Costs, read_json
from kevlarflow.bench.sim.metrics import summarize
from kevlarflow.bench.sim.model import MODES, Failure, TraceRequest, simulate
from kevlarflow.bench.sim.report import CONDITIONS, run_modes
from kevlarflow.bench.sim.workload import sharegpt_like

SCHEMA = "kevlarflow.failover/1"
COMPARED = ("mttr_s", "avg_latency_s", "p99_latency_s", "avg_ttft_s", "p99_ttft_s", "mean_tpot_s")


def _need(data: dict, key: str, where: str):
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{where}: missing {key!r}")
    return data[key]


def read_run(path: str | Path) -> dict:
    """The parts of a real run the simulator needs, checked."""
    data = read_json(path, "benchmark results")
    if _need(data, "schema", str(path)) != SCHEMA:
        raise ValueError(f"{path}: schema {data['schema']!r}, expected {SCHEMA!r}")
    config = _need(data, "config", str(path))
    trace = [TraceRequest(float(_need(r, "arrival_s", f"{path}: trace[{i}]")),
                          int(_need(r, "prompt_tokens", f"{path}: trace[{i}]")),
                          int(_need(r, "output_tokens", f"{path}: trace[{i}]")))
             for i, r in enumerate(_need(data, "trace", str(path)))]
    failures = [Failure(float(_need(f, "at_s", f"{path}: failure")), int(_need(f, "instance", "failure")),
                        int(_need(f, "stage", "failure")), str(f.get("kind", "kill")))
                for f in _need(config, "failures", f"{path}: config")]
    metrics = _need(data, "metrics", str(path))
    unknown = sorted(set(metrics) - set(MODES))
    if unknown:
        raise ValueError(f"{path}: metrics of unknown mode(s) {unknown}")
    return dict(config=config, trace=trace, failures=failures, metrics=metrics,
                fault_free_traces=fault_free_traces(config, metrics))


def fault_free_traces(config: dict, metrics: dict) -> list[list[TraceRequest]] | None:
    """The traces of the run's fault-free rounds, or None where they cannot
    be had. The benchmark draws them (bench/failover/cli.py) from the same
    generator as the failure trace, one seed per round, for `duration_s`
    seconds each; its fault-free figures are medians over those rounds.
    Regenerated here, checked against the recorded request counts."""
    rounds, trace = config.get("fault_free"), config.get("trace")
    if not (isinstance(rounds, dict) and isinstance(trace, dict)
            and trace.get("source") == "sharegpt-like" and rounds.get("seeds")):
        return None
    try:
        traces = [sharegpt_like(float(trace["rate"]), float(rounds["duration_s"]),
                                int(trace["mean_prompt_tokens_asked"]),
                                int(trace["mean_output_tokens_asked"]), seed=int(seed))
                  for seed in rounds["seeds"]]
    except (KeyError, TypeError, ValueError):
        return None
    counts = [len(t) for t in traces]
    for by_condition in metrics.values():
        n = (by_condition.get("fault_free") or {}).get("requests")
        if isinstance(n, dict) and (n.get("min"), n.get("max"), n.get("median")) != (
                min(counts), max(counts), statistics.median(counts)):
            return None  # not the rounds that were run (another vocabulary, a longer round)
    return traces


def simulate_fault_free(costs: Costs, run: dict, mode: str) -> dict:
    """The mode's fault-free figures as the benchmark takes them: over its
    fault-free rounds' traces, the median of each figure; without them, the
    failure trace served without the failure."""
    traces = run.get("fault_free_traces")
    if not traces:
        return run_modes(costs, run["trace"], [], [mode])[mode]["fault_free"]
    runs = [summarize(simulate(costs, trace, mode).requests(), None, 0) for trace in traces]
    return {key: (statistics.median(vals) if len(vals := [r[key] for r in runs
                                                          if r[key] is not None]) == len(runs)
                  else None)
            for key in runs[0]}


def deployment_costs(costs: Costs, config: dict) -> Costs:
    """The costs of this machine, with the run's deployment and settings."""
    changes = dict(instances=_need(config, "num_instances", "config"),
                   stages=_need(config, "pp_size", "config"),
                   max_num_batched_tokens=_need(config, "max_num_batched_tokens", "config"))
    if "replication_interval_s" in config:
        changes["replication_interval_s"] = config["replication_interval_s"]
    if "hang_timeout_s" in config:
        changes["detect_hang_s"] = config["hang_timeout_s"]
    changes["replacement_delay_s"] = config.get("replacement_delay_s", 0.0)
    changes["pinned_instances"] = 1.0 if config.get("instance_cpus") else 0.0
    return costs.with_overrides(**changes)


def _measured(metrics: dict, mode: str, condition: str, key: str) -> float | None:
    value = metrics.get(mode, {}).get(condition, {}).get(key)
    if isinstance(value, dict):
        value = value.get("median")
    return value


FIT_ROUNDS = 3  # TPOT is nearly linear in the CPU costs: a few fixed-point rounds converge


def fit_contention(run: dict, costs: Costs, baseline: str) -> float:
    """The one fitted parameter: how much slower each worker computes in the
    real deployment than the calibration measured it alone (on a small
    machine, workers and the controller share the cores). Fitted on the
    baseline's fault-free TPOT; every other figure is then a prediction."""
    measured = _measured(run["metrics"], baseline, "fault_free", "mean_tpot_s")
    if not measured:
        return 1.0
    factor = 1.0
    for _ in range(FIT_ROUNDS):
        simulated = simulate_fault_free(costs.contended(factor), run, baseline)["mean_tpot_s"]
        if not simulated:
            return 1.0
        factor *= measured / simulated
    return factor


def compare(run: dict, costs: Costs, fit: bool = True) -> dict:
    """{"contention": factor, mode: {condition: {metric: {simulated, measured,
    rel_error, fitted}}}}."""
    costs = deployment_costs(costs, run["config"])
    modes = [m for m in MODES if m in run["metrics"]]
    baseline = "restart" if "restart" in modes else modes[0]
    factor = fit_contention(run, costs, baseline) if fit else 1.0
    costs = costs.contended(factor)
    simulated = run_modes(costs, run["trace"], run["failures"], modes)
    for mode in modes:
        simulated[mode]["fault_free"] = simulate_fault_free(costs, run, mode)
    out = {}
    for mode in modes:
        out[mode] = {}
        for condition in CONDITIONS:
            rows = {}
            for key in COMPARED:
                sim = simulated[mode][condition][key]
                real = _measured(run["metrics"], mode, condition, key)
                error = (sim - real) / real if sim is not None and real else None
                rows[key] = dict(simulated=sim, measured=real, rel_error=error,
                                 fitted=fit and (mode, condition, key) == (
                                     baseline, "fault_free", "mean_tpot_s"))
            out[mode][condition] = rows
    return dict(contention=factor, modes=out)


def prediction_errors(table: dict) -> list[tuple[str, str, str, float]]:
    """(mode, condition, metric, relative error) of every predicted figure
    (measured, simulated, and not the fitted one)."""
    return [(mode, condition, key, r["rel_error"]) for mode, by_condition in table.items()
            for condition, rows in by_condition.items() for key, r in rows.items()
            if r["rel_error"] is not None and not r["fitted"]]


def print_comparison(table: dict) -> None:
    names = {"mttr_s": "MTTR", "avg_latency_s": "avg lat", "p99_latency_s": "p99 lat",
             "avg_ttft_s": "avg TTFT", "p99_ttft_s": "p99 TTFT", "mean_tpot_s": "TPOT"}
    print(f"{'mode':<26} {'condition':<11} {'metric':<9} {'simulated':>10} {'measured':>10} {'error':>8}")
    for mode, by_condition in table.items():
        for condition, rows in by_condition.items():
            for key, r in rows.items():
                if r["simulated"] is None and r["measured"] is None:
                    continue
                f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                err = "-" if r["rel_error"] is None else f"{r['rel_error']:+.0%}"
                print(f"{mode:<26} {condition:<11} {names[key]:<9} {f(r['simulated']):>10} "
                      f"{f(r['measured']):>10} {err:>8}" + ("  (fitted)" if r["fitted"] else ""))


def validate(path: str, costs: Costs, json_out: str | None = None, fit: bool = True) -> dict:
    run = read_run(path)
    result = compare(run, costs, fit)
    table = result["modes"]
    cfg = run["config"]
    print(f"{path}: {cfg.get('preset', '?')}, {cfg['num_instances']} instances x {cfg['pp_size']} "
          f"stages, {len(run['trace'])} requests, failures {[f.__dict__ for f in run['failures']]}")
    print(f"CPU contention factor {result['contention']:.2f}"
          + (" (fitted on the baseline's fault-free TPOT)\n" if fit else " (not fitted)\n"))
    print_comparison(table)
    errors = prediction_errors(table)
    if errors:
        worst = max(errors, key=lambda e: abs(e[3]))
        mean = sum(abs(e[3]) for e in errors) / len(errors)
        print(f"\nmean absolute relative error {mean:.0%} over {len(errors)} predicted figures; "
              f"the worst: {worst[0]} {worst[1]} {worst[2]} {worst[3]:+.0%}")
    if json_out:
        Path(json_out).write_text(json.dumps(dict(schema="kevlarflow.simulate-validation/1",
                                                  source=str(path), costs=costs.to_json(),
                                                  contention=result["contention"],
                                                  validation=table), indent=1))
        print(f"wrote {json_out}")
    return table

