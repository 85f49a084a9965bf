"""Simulated failover benchmark: a discrete-event model of a KevlarFlow
deployment (N instances x P pipeline stages, continuous batching with
chunked prefill) that serves a ShareGPT-like trace while one worker fails,
under each recovery mode (kevlarflow, kevlarflow-no-replication, restart),
with the failure and fault-free.

Costs come from a preset (paper: Llama-3.1-8B on 4 GPUs over 1 Gbit/s;
70b: Llama-3-70B, 8 GPUs per stage over InfiniBand), from this machine
(local: written by --calibrate), or from a JSON file of the fields of
kevlarflow.bench.sim.costs.Costs; --set FIELD=VALUE overrides any of them.
Without --rate the load is 70% of the deployment's fault-free capacity.

--validate RESULTS.json replays a real `kevlarflow bench failover --json`
run (its deployment, trace and failures) and compares simulated and measured
figures. See docs/simulator.md."""
from __future__ import annotations

import argparse
import json
import time

from kevlarflow.bench.sim import costs as cost_model
from kevlarflow.bench.sim.model import FAULTS, MODES, Failure
from kevlarflow.bench.sim.report import (PAPER_FIGURES, print_paper_mttr, print_ratios,
                                         print_results, print_timeline, ratios, run_modes)
from kevlarflow.bench.sim.workload import capacity_requests_per_s, sharegpt_like

DEFAULT_LOAD = 0.7  # of fault-free capacity, without --rate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kevlarflow bench simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--costs", help="paper (the default), 70b, local (after --calibrate; the "
                   "default of --validate) or a costs JSON file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one cost field (repeatable)")
    p.add_argument("--instances", type=int, help="pipeline instances (overrides the costs)")
    p.add_argument("--stages", type=int, help="pipeline stages (overrides the costs)")
    p.add_argument("--rate", type=float, help=f"requests per second (default: {DEFAULT_LOAD:.0%} "
                   "of the fault-free capacity)")
    p.add_argument("--load", type=float, default=DEFAULT_LOAD,
                   help="without --rate: the fraction of the capacity to offer")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of arrivals")
    p.add_argument("--fail-at", type=float, default=300.0, help="seconds into the trace")
    p.add_argument("--fault", default="kill", choices=FAULTS)
    p.add_argument("--fail-instance", type=int, default=0)
    p.add_argument("--fail-stage", type=int, default=1)
    p.add_argument("--mean-prompt", type=int, default=256)
    p.add_argument("--mean-output", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine's costs (for --costs local) and exit")
    p.add_argument("--preset", default="medium", help="with --calibrate: the model to measure")
    p.add_argument("--out", help="with --calibrate: also write the costs to this file")
    p.add_argument("--validate", metavar="RESULTS",
                   help="compare with a real run's JSON (default costs: local)")
    p.add_argument("--no-fit", action="store_true",
                   help="with --validate: do not fit the CPU contention factor")
    return p


def load_costs(args) -> cost_model.Costs:
    costs = cost_model.resolve(args.costs)
    changes = dict(cost_model.parse_override(text) for text in args.set)
    if args.instances is not None:
        changes["instances"] = args.instances
    if args.stages is not None:
        changes["stages"] = args.stages
    return costs.with_overrides(**changes) if changes else costs


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except ValueError as exc:
        parser.exit(2, f"kevlarflow bench simulate: error: {exc}\n")


def _run(args) -> None:
    if args.calibrate:
        from kevlarflow.bench.sim.calibrate import calibrate
        calibrate(args.preset, args.out)
        return
    if args.validate:
        from kevlarflow.bench.sim.validate import validate
        args.costs = args.costs or "local"
        validate(args.validate, load_costs(args), args.json, fit=not args.no_fit)
        return
    args.costs = args.costs or "paper"
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    costs = load_costs(args)
    if not (0 <= args.fail_at < args.duration):
        raise ValueError(f"--fail-at must be within the trace, [0, {args.duration}) s")
    capacity = capacity_requests_per_s(costs, args.mean_prompt, args.mean_output, args.seed)
    if args.rate is None and not 0 < args.load:
        raise ValueError(f"--load must be positive, got {args.load}")
    rate = args.rate if args.rate is not None else args.load * capacity
    trace = sharegpt_like(rate, args.duration, args.mean_prompt, args.mean_output, seed=args.seed)
    failures = [Failure(args.fail_at, args.fail_instance, args.fail_stage, args.fault)]
    started = time.perf_counter()
    results = run_modes(costs, trace, failures, modes)
    paper = args.costs == "paper"
    print(f"costs {args.costs}: {costs.instances} instances x {costs.stages} stages, "
          f"max_num_batched_tokens {costs.max_num_batched_tokens}; trace {len(trace)} requests "
          f"over {args.duration:.0f} s at {rate:.2f}/s ({rate / capacity:.0%} of the fault-free "
          f"capacity, {capacity:.2f}/s), mean prompt {args.mean_prompt}, output "
          f"{args.mean_output}; {args.fault} of worker ({args.fail_instance}, {args.fail_stage}) "
          f"at {args.fail_at:.0f} s; simulated in {time.perf_counter() - started:.1f} s\n")
    print_results(results)
    table = ratios(results)
    print_ratios(table, paper)
    if paper:
        print_paper_mttr(results)
    print_timeline(results)
    if args.json:
        out = dict(schema="kevlarflow.simulate/1", costs=costs.to_json(), costs_source=args.costs,
                   trace=dict(source="sharegpt-like", rate=rate, duration_s=args.duration,
                              mean_prompt=args.mean_prompt, mean_output=args.mean_output,
                              seed=args.seed, requests=len(trace),
                              capacity_requests_per_s=capacity),
                   failures=[f.__dict__ for f in failures], results=results, ratios=table)
        if paper:
            out["paper_reported"] = PAPER_FIGURES
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
