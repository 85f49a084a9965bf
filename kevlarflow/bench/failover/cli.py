"""`kevlarflow bench failover`: the command line, and the order of the runs."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kevlarflow.bench.failover import metrics as m
from kevlarflow.bench.failover.report import ratios_text, table, targets_text, write_json
from kevlarflow.bench.failover.runner import MODES, Deployment, Failure, capacity, replay
from kevlarflow.bench.trace import sharegpt_file, sharegpt_like, summary

CONDITIONS = ("failure", "fault_free")


def build_parser() -> argparse.ArgumentParser:
    from kevlarflow.bench import failover
    from kevlarflow.model.presets import FLAVOURS, PRESETS

    p = argparse.ArgumentParser(prog="kevlarflow bench failover", description=failover.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face model folder (default: a cached --preset)")
    p.add_argument("--preset", default="medium", choices=sorted(PRESETS),
                   help="random-weight checkpoint, made once")
    p.add_argument("--flavour", default="llama", choices=sorted(FLAVOURS))
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--stages", type=int, default=2)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="requests per second")
    load.add_argument("--load", type=float, default=0.7,
                      help="rate as a fraction of the measured fault-free capacity (default 0.7)")
    p.add_argument("--capacity-requests", type=int, default=16,
                   help="requests of the capacity measurement")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--prompt-len", type=int, default=64, help="mean prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="mean output tokens")
    p.add_argument("--sharegpt", help="a local ShareGPT JSON file instead of drawn lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fail", action="append", type=Failure.parse,
                   metavar="AT:INSTANCE:STAGE[:KIND]",
                   help="a fault (kill or hang) at AT seconds into the trace; repeatable "
                        "(default: a kill of worker (0, last stage) halfway through)")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help="failure, fault_free or both (each mode runs each)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens")
    p.add_argument("--kv-memory", type=int, default=256 << 20, help="bytes per worker pool")
    p.add_argument("--replication-interval", type=float, default=0.5, metavar="S",
                   help="least seconds between two KV transfers of a worker (default 0.5, the "
                        "deployment's)")
    p.add_argument("--replacement-delay", type=float, default=0.0, metavar="S",
                   help="seconds before a failed slot's new process can start, in every mode "
                        "(a cluster provisioning a node; default 0: a restart on this machine)")
    p.add_argument("--slo-ttft", type=float, help="goodput SLO on TTFT, seconds (default: "
                   f"{m.SLO_FACTOR:g}x the fault-free baseline's median)")
    p.add_argument("--slo-tpot", type=float, help="goodput SLO on TPOT, seconds (same default)")
    p.add_argument("--out", default="failover-results", help="folder for the JSON and the plots")
    return p


def parse(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.modes, args.conditions = args.modes.split(","), args.conditions.split(",")
    for name, values, known in (("--modes", args.modes, MODES),
                                ("--conditions", args.conditions, CONDITIONS)):
        if not values or not set(values) <= set(known):
            parser.error(f"{name}: unknown {sorted(set(values) - set(known))}; "
                         f"known: {list(known)}")
    for name in ("instances", "stages", "repeats", "capacity_requests", "chunk", "kv_memory"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.rate is not None and args.rate <= 0) or not 0 < args.load <= 4 or args.duration <= 0:
        parser.error("--rate and --duration must be positive, --load in (0, 4]")
    if not (0 <= args.replication_interval <= 10 and 0 <= args.replacement_delay < 3600):
        parser.error("--replication-interval must be in [0, 10] s, --replacement-delay in "
                     "[0, 3600) s")
    if args.fail is None:
        args.fail = [Failure(args.duration / 2, 0, args.stages - 1, "kill")]
    for f in args.fail:
        if not (f.instance < args.instances and f.stage < args.stages):
            parser.error(f"--fail: no worker at instance {f.instance}, stage {f.stage}")
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a Hugging Face model folder)")
    if args.sharegpt and not Path(args.sharegpt).is_file():
        parser.error(f"--sharegpt {args.sharegpt}: no such file")
    if "failure" not in args.conditions:
        args.fail = []
    return args


def make_trace(args, rate: float, vocab: int, tokenizer, seed: int):
    try:
        if args.sharegpt:
            return sharegpt_file(args.sharegpt, rate, args.duration, tokenizer,
                                 max_prompt=8 * args.prompt_len, max_output=8 * args.output_len,
                                 seed=seed)
        return sharegpt_like(rate, args.duration, args.prompt_len, args.output_len, vocab, seed)
    except ValueError as exc:
        raise SystemExit(f"kevlarflow bench failover: error: {exc}") from None


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    # The table is the output: workers' routine logs would bury it.
    os.environ.setdefault("KEVLARFLOW_LOG_LEVEL", "WARNING")
    from kevlarflow.bench.throughput import ensure_model
    from kevlarflow.model.config import ModelConfig

    started = time.time()
    model = args.model or ensure_model(args.preset, args.flavour)
    vocab = ModelConfig.from_pretrained(model).vocab_size
    tokenizer = None
    if args.sharegpt:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    deployment = Deployment(model, args.instances, args.stages, args.chunk, args.kv_memory,
                            args.replication_interval, args.replacement_delay)

    measured_capacity = None
    rate = args.rate
    if rate is None:
        # Requests with the trace's lengths (another seed), all served at
        # once: their arrival times do not matter, only that there are enough.
        probe_rate = max(1.0, 1.5 * args.capacity_requests / args.duration)
        probe = make_trace(args, probe_rate, vocab, tokenizer, args.seed + 1)
        probe = probe[:args.capacity_requests]
        if not probe:
            raise SystemExit("kevlarflow bench failover: error: no request to measure the "
                             "capacity with; give --rate")
        measured_capacity = capacity(deployment, probe)
        rate = args.load * measured_capacity
        print(f"fault-free capacity {measured_capacity:.3f} requests/s; replaying at "
              f"{args.load:.0%} of it: {rate:.3f} requests/s", flush=True)
    trace = make_trace(args, rate, vocab, tokenizer, args.seed)
    if not trace:
        raise SystemExit(f"no request arrives in {args.duration} s at {rate:.3f}/s: "
                         "raise --duration or --rate")
    schedule = ", ".join(f"{f.kind} of ({f.instance}, {f.stage}) at {f.at_s:g} s"
                         for f in args.fail)
    print(f"{len(trace)} requests over {args.duration:g} s; failures: {schedule or 'none'}",
          flush=True)

    runs = {mode: {c: [] for c in args.conditions} for mode in args.modes}
    total = args.repeats * len(args.modes) * len(args.conditions)
    done = 0
    for r in range(args.repeats):
        # Alternating, and each repeat starts one mode later, so that neither
        # drift on the machine nor a place in the order favours a mode.
        shift = r % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            for condition in args.conditions:
                done += 1
                label = f"[{done}/{total}] {mode} {condition.replace('_', '-')}"
                failures = args.fail if condition == "failure" else []
                run = replay(deployment, mode, trace, failures, label)
                runs[mode][condition].append(run)
                print(f"{label}: {len(m.completed(run))}/{len(trace)} requests in "
                      f"{run['elapsed_s']:.1f} s", flush=True)
    return finish(args, model, deployment, trace, runs, rate, measured_capacity, started)


def finish(args, model, deployment, trace, runs, rate, measured_capacity, started) -> dict:
    from kevlarflow.bench.failover.timeline import plot_modes, plot_run
    from kevlarflow.deploy.config import DeploymentConfig

    base_mode = "restart" if "restart" in runs else args.modes[0]
    base_runs = runs[base_mode].get("fault_free") or next(iter(runs[base_mode].values()))
    slo = m.slos(base_runs[0])
    slo.update({k: v for k, v in (("ttft_s", args.slo_ttft), ("tpot_s", args.slo_tpot)) if v})
    metrics = {mode: {c: m.summarize([m.run_metrics(run, slo) for run in rs])
                      for c, rs in by_condition.items()} for mode, by_condition in runs.items()}
    ratios = m.paper_ratios(metrics)
    targets = m.targets(metrics, ratios)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = (f"{Path(model).name}, {args.instances} x {args.stages}, {len(trace)} requests at "
             f"{rate:.2f}/s")
    timelines = []
    for mode, by_condition in runs.items():
        for condition, rs in by_condition.items():
            for i, run in enumerate(rs):
                path = out / f"timeline-{mode}-{condition.replace('_', '-')}-{i + 1}.png"
                plot_run(run, f"{mode}, {condition.replace('_', '-')}, run {i + 1}: {where}", path)
                timelines.append(path.name)
    if "failure" in args.conditions:
        path = out / "timeline-failure.png"
        plot_modes({mode: rs["failure"][0] for mode, rs in runs.items()},
                   f"every mode under the same failure: {where}", path)
        timelines.insert(0, path.name)

    config = dict(model=model, preset=None if args.model else args.preset,
                  num_instances=args.instances, pp_size=args.stages,
                  max_num_batched_tokens=args.chunk, kv_cache_memory=args.kv_memory,
                  replication_interval_s=args.replication_interval,
                  replacement_delay_s=args.replacement_delay,
                  **{k: getattr(DeploymentConfig, k) for k in ("hang_timeout_s", "heartbeat_s")},
                  trace=dict(source=args.sharegpt or "sharegpt-like", rate=rate,
                             duration_s=args.duration, seed=args.seed,
                             mean_prompt_tokens_asked=args.prompt_len,
                             mean_output_tokens_asked=args.output_len, **summary(trace)),
                  load=dict(fraction=args.load if args.rate is None else None,
                            capacity_rps=measured_capacity),
                  failures=[f.as_json() for f in args.fail], modes=args.modes,
                  conditions=args.conditions, repeats=args.repeats,
                  wall_s=time.time() - started)
    trace_json = [dict(arrival_s=r.arrival_s, prompt_tokens=len(r.prompt),
                       output_tokens=r.output_len) for r in trace]
    write_json(out / "failover.json", config, trace_json, runs, metrics, ratios, targets, slo,
               timelines)

    print(f"\n{where}; {args.repeats} run(s) per mode and condition"
          + (", median (min-max)" if args.repeats > 1 else "") + "; SLOs for goodput: TTFT "
          + ("none" if slo["ttft_s"] is None else f"<= {slo['ttft_s']:.2f} s") + ", TPOT "
          + ("none" if slo["tpot_s"] is None else f"<= {slo['tpot_s'] * 1000:.0f} ms"))
    print(table(metrics, args.repeats))
    print()
    print(ratios_text(ratios))
    print("targets (kevlarflow mode):")
    print(targets_text(targets))
    print(f"\nwrote {out / 'failover.json'} and {len(timelines)} timeline(s) in {out}/ "
          f"({time.time() - started:.0f} s in all)")
    return dict(metrics=metrics, ratios=ratios, targets=targets)
