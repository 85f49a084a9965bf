"""`kevlarflow bench failover`: the command line, and the order of the runs."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from kevlarflow.bench.failover import metrics as m
from kevlarflow.bench.failover.paired import run_rounds
from kevlarflow.bench.failover.results import finish
from kevlarflow.bench.failover.runner import (MODES, Deployment, Failure, capacity, replay,
                                              split_cpus)
from kevlarflow.bench.trace import sharegpt_file, sharegpt_like

CONDITIONS = ("failure", "fault_free")
CAPACITY_WARMUP = 8
CAPACITY_IN_FLIGHT = (32, 64, 128, 256)  # tried in turn while the rate still grows
MIN_DURATION_S = 6.0
# A failure trace runs on past its last failure for this many replacement
# delays (a restart's outage, and as long again for the queue it built to
# drain), and at least MIN_TAIL_S (a restart on this machine takes seconds).
TAIL_DELAYS, MIN_TAIL_S = 2, 10.0


def delays(text: str) -> list[float]:
    """A comma-separated list of replacement delays, in seconds."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a list of seconds, e.g. 0,30; got {text!r}") from None
    if not all(0 <= v < 3600 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"distinct delays in [0, 3600) s; got {text!r}")
    return values


def setting_name(delay: float) -> str:
    return "same-machine" if delay == 0 else f"new-node-{delay:g}s"


def build_parser() -> argparse.ArgumentParser:
    from kevlarflow.bench import failover
    from kevlarflow.model.device import device_option
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
    p.add_argument("--capacity-requests", type=int, default=32,
                   help="the fewest completions each level of the capacity measurement is "
                        f"timed over, after {CAPACITY_WARMUP} to settle (default 32)")
    p.add_argument("--capacity-seconds", type=float, default=5.0, metavar="S",
                   help="the least seconds each level of the capacity measurement is timed "
                        "over (default 5)")
    p.add_argument("--requests", type=int, default=40,
                   help="the fewest requests of a trace: without --duration, its length is "
                        "scaled from the rate to hold them (default 40)")
    p.add_argument("--duration", type=float,
                   help="seconds of arrivals of the fault-free rounds (default: long enough "
                        f"for --requests, at least {MIN_DURATION_S:g} s); a failure trace goes on "
                        f"{TAIL_DELAYS}x the replacement delay past the last failure, at least "
                        f"{MIN_TAIL_S:g} s")
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
    p.add_argument("--repeats", type=int, default=1, help="runs per mode under failure")
    p.add_argument("--rounds", type=int, default=8,
                   help="fault-free rounds: each mode serves each round's trace on a live "
                        "deployment, interleaved; the fault-free cost is the per-round ratio "
                        "(default 8)")
    p.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens")
    p.add_argument("--kv-memory", type=int, default=256 << 20, help="bytes per worker pool")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", type=device_option,
                   help="where the workers run: on cuda, round-robin over the visible GPUs "
                        "(several share one when there are fewer GPUs than workers)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on cuda, the workers run every step eagerly (default: decode steps "
                        "replay CUDA graphs)")
    p.add_argument("--replication-interval", type=float, default=0.5, metavar="S",
                   help="least seconds between two KV transfers of a worker (default 0.5, the "
                        "deployment's)")
    p.add_argument("--replacement-delay", type=delays, default=[0.0], metavar="S[,S...]",
                   help="seconds before a failed slot's new process can start, in every mode "
                        "(a cluster provisioning a node); each value is a setting of its own "
                        "under failure (default 0: a restart on this machine)")
    p.add_argument("--pin-instances", action=argparse.BooleanOptionalAction, default=False,
                   help="run each instance's workers on CPUs of their own (this machine's "
                        "split evenly): losing an instance then loses its compute, as on a "
                        "cluster where each worker owns its GPU")
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
    for name in ("instances", "stages", "repeats", "rounds", "capacity_requests", "requests",
                 "chunk", "kv_memory"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.rate is not None and args.rate <= 0) or not 0 < args.load <= 4 or \
            (args.duration is not None and args.duration <= 0):
        parser.error("--rate and --duration must be positive, --load in (0, 4]")
    if not args.capacity_seconds > 0:
        parser.error("--capacity-seconds must be positive")
    if not 0 <= args.replication_interval <= 10:
        parser.error("--replication-interval must be in [0, 10] s")
    for f in args.fail or []:
        if not (f.instance < args.instances and f.stage < args.stages):
            parser.error(f"--fail: no worker at instance {f.instance}, stage {f.stage}")
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a Hugging Face model folder)")
    if args.sharegpt and not Path(args.sharegpt).is_file():
        parser.error(f"--sharegpt {args.sharegpt}: no such file")
    if "failure" not in args.conditions:
        args.fail = []
    return args


def trace_length(args, rate: float) -> float:
    """Seconds of arrivals of the fault-free rounds: --duration, or enough
    for --requests at the rate."""
    return args.duration or max(MIN_DURATION_S, args.requests / rate)


def failures_for(args, base_s: float) -> list[Failure]:
    """--fail, or one kill of worker (0, last stage) halfway through."""
    if args.fail is None:
        return [Failure(round(base_s / 2, 1), 0, args.stages - 1, "kill")]
    return args.fail


def failure_trace_s(args, base_s: float, failures: list[Failure], delay: float) -> float:
    """Seconds of arrivals of a failure trace: --duration, or on past the last
    failure for TAIL_DELAYS replacement delays and at least MIN_TAIL_S."""
    if args.duration:
        return args.duration
    last = max(f.at_s for f in failures)
    return max(base_s, last + TAIL_DELAYS * delay, last + MIN_TAIL_S)


def make_trace(args, rate: float, duration_s: float, vocab: int, tokenizer, seed: int):
    try:
        if args.sharegpt:
            return sharegpt_file(args.sharegpt, rate, duration_s, tokenizer,
                                 max_prompt=8 * args.prompt_len, max_output=8 * args.output_len,
                                 seed=seed)
        return sharegpt_like(rate, duration_s, args.prompt_len, args.output_len, vocab, seed)
    except ValueError as exc:
        raise SystemExit(f"kevlarflow bench failover: error: {exc}") from None


def trace_holding(args, rate: float, duration_s: float, vocab: int, tokenizer, seed: int):
    """(trace, its duration): a trace of at least duration_s seconds that
    holds at least --requests requests unless --duration fixed its length
    (Poisson arrivals can fall short of rate x duration)."""
    trace = make_trace(args, rate, duration_s, vocab, tokenizer, seed)
    while not args.duration and len(trace) < args.requests:
        duration_s *= 1.1
        trace = make_trace(args, rate, duration_s, vocab, tokenizer, seed)
    if not trace:
        raise SystemExit(f"no request arrives in {duration_s:g} s at {rate:.3f}/s: "
                         "raise --duration or --rate")
    return trace, duration_s


def probe_requests(args, vocab: int, tokenizer):
    """Requests of the trace's lengths without end, for the capacity
    measurement (other seeds than the traces': none of them is served
    twice, which the prefix cache would make cheaper)."""
    seed = args.seed + 1_000_001
    while True:
        yield from make_trace(args, 100.0, 2.0, vocab, tokenizer, seed)
        seed += 1


def measure_capacity(args, deployment: Deployment, vocab: int, tokenizer) -> dict:
    """The saturated closed-loop capacity (runner.capacity)."""
    from kevlarflow.engine.llm_engine import EngineConfig

    # Saturated only where requests queue: past what the instances run at once.
    queued = 2 * args.instances * EngineConfig.max_num_seqs
    measured = capacity(deployment, probe_requests(args, vocab, tokenizer), CAPACITY_WARMUP,
                        args.capacity_requests, args.capacity_seconds, CAPACITY_IN_FLIGHT,
                        queued_from=queued)
    levels = ", ".join(f"{level['tokens_per_s']:.0f} at {level['in_flight']}"
                       for level in measured["levels"])
    measured.update(how=f"closed loop on the plain system, output tokens/s by requests in "
                        f"flight: {levels}; the best / {measured['mean_output_tokens']:.1f} "
                        "tokens per request")
    return measured


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
                            args.replication_interval,
                            instance_cpus=split_cpus(args.instances) if args.pin_instances
                            else None, device=args.device,
                            enforce_eager=args.enforce_eager)

    measured = None
    rate = args.rate
    if rate is None:
        measured = measure_capacity(args, deployment, vocab, tokenizer)
        rate = args.load * measured["rps"]
        print(f"fault-free capacity {measured['rps']:.3f} requests/s ({measured['how']}); "
              f"replaying at {args.load:.0%} of it: {rate:.3f} requests/s", flush=True)
    base_s = trace_length(args, rate)
    failures = failures_for(args, base_s) if "failure" in args.conditions else []
    ctx = dict(args=args, model=model, rate=rate, capacity=measured, started=started,
               base_s=base_s, failures=failures)

    fault_free = {}
    if "fault_free" in args.conditions:
        traces = [trace_holding(args, rate, base_s, vocab, tokenizer, args.seed + r)[0]
                  for r in range(args.rounds)]
        print(f"fault-free: {args.rounds} round(s) of {min(map(len, traces))} to "
              f"{max(map(len, traces))} requests (the failure traces have the same rate and "
              "lengths)", flush=True)
        fault_free = run_rounds(deployment, args.modes, traces)

    delays = args.replacement_delay if failures else [None]
    results = {}
    for delay in delays:
        name = "fault-free" if delay is None else setting_name(delay)
        out = Path(args.out) / name if len(delays) > 1 else Path(args.out)
        setting = replace(deployment, replacement_delay_s=delay or 0.0)
        duration = base_s if delay is None else failure_trace_s(args, base_s, failures, delay)
        trace, duration = trace_holding(args, rate, duration, vocab, tokenizer, args.seed)
        runs = {mode: [] for mode in args.modes}
        if delay is not None:
            schedule = ", ".join(f"{f.kind} of ({f.instance}, {f.stage}) at {f.at_s:g} s"
                                 for f in failures)
            print(f"\n{name} (replacement delay {delay:g} s): {len(trace)} requests over "
                  f"{duration:.1f} s; failures: {schedule}", flush=True)
            for r in range(args.repeats):
                # Alternating, and each repeat starts one mode later, so that
                # neither drift on the machine nor a place in the order
                # favours a mode.
                shift = r % len(args.modes)
                for mode in args.modes[shift:] + args.modes[:shift]:
                    label = f"[{name} {r + 1}/{args.repeats}] {mode} failure"
                    run = replay(setting, mode, trace, failures, label)
                    runs[mode].append(run)
                    print(f"{label}: {len(m.completed(run))}/{len(trace)} requests in "
                          f"{run['elapsed_s']:.1f} s", flush=True)
        results[name] = finish(ctx, name, delay, setting, trace, duration, runs, fault_free,
                                out)
    if len(results) > 1:
        print("\nall settings:")
        for name, r in results.items():
            print(f"  {name}: " + "; ".join(
                f"{t['what']} {'-' if t['value'] is None else format(t['value'], '.3g')} "
                f"({'n/a' if t['met'] is None else 'met' if t['met'] else 'NOT met'})"
                for t in r["targets"].values()))
    print(f"({time.time() - started:.0f} s in all)")
    return results
