"""One setting's results: its metrics and targets from the run records, the
timeline plots, the JSON file and the printed table."""
from __future__ import annotations

import time
from pathlib import Path

from kevlarflow.bench.failover import metrics as m
from kevlarflow.bench.failover.paired import paired_overhead
from kevlarflow.bench.failover.report import (paired_text, ratios_text, replication_text,
                                              table, targets_text, write_json)
from kevlarflow.bench.failover.runner import Deployment
from kevlarflow.bench.trace import summary


def finish(ctx: dict, name: str, delay: float | None, deployment: Deployment, trace,
           duration: float, runs, fault_free: dict, out: Path) -> dict:
    """One setting's metrics, table, targets, plots and JSON file."""
    from kevlarflow.bench.failover.timeline import plot_modes, plot_run
    from kevlarflow.deploy.config import DeploymentConfig

    args = ctx["args"]
    base_mode = "restart" if "restart" in args.modes else args.modes[0]
    base_run = (fault_free.get(base_mode) or runs[base_mode])[0]
    slo = m.slos(base_run)
    slo.update({k: v for k, v in (("ttft_s", args.slo_ttft), ("tpot_s", args.slo_tpot)) if v})
    metrics, per_round = {}, {}
    for mode in args.modes:
        metrics[mode] = {}
        if runs[mode]:
            metrics[mode]["failure"] = m.summarize([m.run_metrics(r, slo) for r in runs[mode]])
        if fault_free:
            per_round[mode] = [m.run_metrics(r, slo) for r in fault_free[mode]]
            metrics[mode]["fault_free"] = m.summarize(per_round[mode])
    pairs = paired_overhead(per_round, base_mode) if per_round else {}
    ratios = m.paper_ratios(metrics)
    for mode, by_metric in pairs.items():  # the paired estimate replaces the medians' ratio
        ratios[mode]["fault_free_overhead"] = {k: v and v["mean"] for k, v in by_metric.items()}
    targets = m.targets(metrics, ratios, pairs, new_node=bool(delay))

    out.mkdir(parents=True, exist_ok=True)
    where = (f"{Path(ctx['model']).name}, {args.instances} x {args.stages}, {len(trace)} requests "
             f"at {ctx['rate']:.2f}/s" + ("" if delay is None else f", {name}"))
    timelines = []
    for mode in args.modes:
        # Every failure run, and the first fault-free round.
        for condition, rs in (("failure", runs[mode]), ("fault_free", fault_free.get(mode, [])[:1])):
            for i, run in enumerate(rs):
                path = out / f"timeline-{mode}-{condition.replace('_', '-')}-{i + 1}.png"
                plot_run(run, f"{mode}, {condition.replace('_', '-')}, run {i + 1}: {where}", path)
                timelines.append(path.name)
    if any(runs.values()):
        path = out / "timeline-failure.png"
        plot_modes({mode: rs[0] for mode, rs in runs.items() if rs},
                   f"every mode under the same failure: {where}", path)
        timelines.insert(0, path.name)

    config = dict(model=ctx["model"], preset=None if args.model else args.preset,
                  setting=name, num_instances=args.instances, pp_size=args.stages,
                  max_num_batched_tokens=args.chunk, kv_cache_memory=args.kv_memory,
                  device=args.device,
                  replication_interval_s=args.replication_interval,
                  replacement_delay_s=deployment.replacement_delay_s,
                  instance_cpus=deployment.instance_cpus,
                  **{k: getattr(DeploymentConfig, k) for k in ("hang_timeout_s", "heartbeat_s")},
                  trace=dict(source=args.sharegpt or "sharegpt-like", rate=ctx["rate"],
                             duration_s=duration, seed=args.seed,
                             mean_prompt_tokens_asked=args.prompt_len,
                             mean_output_tokens_asked=args.output_len, **summary(trace)),
                  fault_free=dict(rounds=args.rounds if fault_free else 0,
                                  duration_s=ctx["base_s"],
                                  seeds=list(range(args.seed, args.seed + args.rounds))
                                  if fault_free else []),
                  load=dict(fraction=args.load if args.rate is None else None,
                            capacity_rps=ctx["capacity"] and ctx["capacity"]["rps"],
                            capacity=ctx["capacity"]),
                  failures=[f.as_json() for f in (ctx["failures"] if delay is not None else [])],
                  modes=args.modes, conditions=args.conditions, repeats=args.repeats,
                  wall_s=time.time() - ctx["started"])
    trace_json = [dict(arrival_s=r.arrival_s, prompt_tokens=len(r.prompt),
                       output_tokens=r.output_len) for r in trace]
    all_runs = {mode: {**({"failure": runs[mode]} if runs[mode] else {}),
                       **({"fault_free": fault_free[mode]} if fault_free else {})}
                for mode in args.modes}
    write_json(out / "failover.json", config, trace_json, all_runs, metrics, ratios, targets,
               slo, timelines, pairs)

    print(f"\n{where}; under failure {args.repeats} run(s) per mode"
          + (f", fault-free {args.rounds} round(s)" if fault_free else "")
          + "; median (min-max) where several; SLOs for goodput: TTFT "
          + ("none" if slo["ttft_s"] is None else f"<= {slo['ttft_s']:.2f} s") + ", TPOT "
          + ("none" if slo["tpot_s"] is None else f"<= {slo['tpot_s'] * 1000:.0f} ms"))
    print(table(metrics, max(args.repeats, args.rounds if fault_free else 1)))
    print()
    print(ratios_text(ratios, overhead=not pairs))
    if pairs:
        print(paired_text(pairs, args.rounds))
        print(replication_text(metrics))
    print("targets (kevlarflow mode):")
    print(targets_text(targets))
    print(f"wrote {out / 'failover.json'} and {len(timelines)} timeline(s) in {out}/", flush=True)
    return dict(metrics=metrics, ratios=ratios, targets=targets, fault_free_pairs=pairs)
