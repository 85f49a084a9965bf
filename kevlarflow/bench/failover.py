"""One failure under steady load: KevlarFlow with and without KV replication
against the restart baseline, on the same request trace; and the fault-free
cost of replication.

Failure runs: each mode starts a fresh deployment (2 instances x 2 stages),
replays the trace (Poisson arrivals, seeded lengths) and, at the same moment
of the trace, delivers the same fault to the same worker. Reported per mode:
time to detect, "resumed" (the failed instance's communicator is up again),
MTTR (from the failure until the failed instance completes a forward step
again), the time until each request in flight on the failed instance gets its
next token, their TTFT and end-to-end latency, and the tokens recomputed and
restored from replicas; then the ratios restart / mode.

Overhead runs (fault-free, replication on vs off, alternating): the same
trace replayed for latency (median and p99 end-to-end), and a saturating
batch (every request at once) for throughput; plus what replication moved
(GB/s) and its lag in tokens."""
from __future__ import annotations

import argparse
import random
import statistics
import time

from kevlarflow.bench.throughput import ensure_model
from kevlarflow.bench.timing import cpu_model

LAG_SAMPLE_S = 0.1

MODES = {  # name -> deployment options
    "kevlarflow": dict(recovery="kevlarflow"),
    "kevlarflow-no-replication": dict(recovery="kevlarflow", replica_memory=0),
    "restart": dict(recovery="restart"),
}


def make_trace(rate: float, duration_s: float, prompt_len: int, output_len: int, vocab: int,
               seed: int = 0) -> list[tuple[float, list[int], int]]:
    """(arrival offset s, prompt token ids, output tokens) per request."""
    rng = random.Random(seed)
    trace, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            return trace
        n_in = max(4, int(rng.lognormvariate(0, 0.5) * prompt_len))
        n_out = max(4, int(rng.lognormvariate(0, 0.5) * output_len))
        trace.append((t, [rng.randrange(16, vocab) for _ in range(n_in)], n_out))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def deployment(model: str, options: dict, args):
    """A fresh 2 x 2 deployment with the benchmark's pool and batch sizes."""
    from kevlarflow import LLM

    return LLM(model, num_instances=2, pp_size=2, max_num_batched_tokens=args.chunk,
               kv_cache_memory=args.kv_memory, **options)


class LagSampler:
    """Replication lag of every running request, every LAG_SAMPLE_S (sampled:
    computing it costs the controller time)."""

    def __init__(self, engine):
        self.engine, self.lags, self.next = engine, [], 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.lags += self.engine.replication.lag()
            self.next = now + LAG_SAMPLE_S


def replay(model: str, options: dict, trace, args, fault=None) -> dict:
    """Serve the trace on a fresh deployment; fault: (instance, stage, kind,
    at seconds into the trace) or None."""
    from kevlarflow import SamplingParams

    llm = deployment(model, options, args)
    engine = llm.engine
    sample_lag = LagSampler(engine)
    try:
        start = time.time()
        pending = list(trace)
        tokens_at: dict[str, list[float]] = {}
        arrived: dict[str, float] = {}
        owner_at_failure: dict[str, int] = {}
        failed_at = None
        seqs = []
        while pending or engine.has_unfinished():
            now = time.time()
            while pending and start + pending[0][0] <= now:
                _, prompt, n_out = pending.pop(0)
                seq = engine.add_request(prompt, SamplingParams(max_tokens=n_out, temperature=0,
                                                                ignore_eos=True))
                tokens_at[seq.request_id], arrived[seq.request_id] = [], now
                seqs.append(seq)
            if fault and failed_at is None and now - start >= fault[3]:
                owner_at_failure = {q.request_id: engine.owner[q].index for q in seqs
                                    if not q.is_finished}
                engine.inject_fault(*fault[:3])
                failed_at = time.time()
            for out in engine.step(timeout_s=0.02):
                tokens_at[out.request_id].extend([time.time()] * len(out.new_token_ids))
            sample_lag()
        elapsed = time.time() - start
        result = dict(requests=len(seqs), elapsed_s=elapsed,
                      tokens=sum(len(q.output_token_ids) for q in seqs),
                      errors=sum(1 for q in seqs if q.finish_reason == "error"),
                      latency=[tokens_at[r][-1] - arrived[r] for r in arrived if tokens_at[r]],
                      ttft=[tokens_at[r][0] - arrived[r] for r in arrived if tokens_at[r]],
                      replicated_bytes=engine.replication.stats["bytes_replicated"],
                      lag=sample_lag.lags, **{k: engine.replication.stats[k] for k in
                                   ("tokens_restored", "tokens_recomputed")})
        if fault:
            result.update(_failure_figures(engine, fault[0], owner_at_failure, tokens_at, arrived))
        return result
    finally:
        llm.shutdown()


def _failure_figures(engine, victim: int, owner_at_failure, tokens_at, arrived) -> dict:
    events = engine.events
    failed = events.of("failed")[0].time
    first = lambda kind: next((e.time - failed for e in events.of(kind)  # noqa: E731
                               if e.instance == victim), None)
    affected = [rid for rid, inst in owner_at_failure.items() if inst == victim]
    next_token = []
    for rid in affected:
        after = [t for t in tokens_at[rid] if t > failed]
        if after:
            next_token.append(after[0] - failed)
    return dict(detect_s=events.of("detected")[0].time - failed, resume_s=first("resumed"),
                mttr_s=first("first_step_after_failure"), next_token_s=next_token,
                affected=len(affected),
                affected_latency=[tokens_at[r][-1] - arrived[r] for r in affected if tokens_at[r]])


def saturate(model: str, options: dict, trace, args) -> dict:
    """Every request of the trace at once: output tokens per second."""
    from kevlarflow import SamplingParams

    with deployment(model, options, args) as llm:
        engine = llm.engine
        sample_lag = LagSampler(engine)
        start = time.perf_counter()
        seqs = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                for _, p, n in trace]
        while engine.has_unfinished():
            engine.step()
            sample_lag()
        elapsed = time.perf_counter() - start
        return dict(tok_s=sum(len(q.output_token_ids) for q in seqs) / elapsed,
                    replicated_bytes=engine.replication.stats["bytes_replicated"],
                    elapsed_s=elapsed, lag=sample_lag.lags)


def spread(values, scale=1.0, digits=2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _median(values):
    return statistics.median(values) if values else None


def report_failures(runs: dict[str, list[dict]], header: str) -> None:
    print(f"\n{header}")
    print(f"{'mode':26} {'detect ms':>17} {'resumed s':>17} {'MTTR s':>17} {'next token s':>17} "
          f"{'recomputed':>10} {'restored':>9} {'errors':>6}")
    for mode, rs in runs.items():
        print(f"{mode:26} {spread([r['detect_s'] for r in rs], 1000, 1):>17} "
              f"{spread([r['resume_s'] for r in rs]):>17} {spread([r['mttr_s'] for r in rs]):>17} "
              f"{spread([_median(r['next_token_s']) for r in rs]):>17} "
              f"{statistics.median(r['tokens_recomputed'] for r in rs):10.0f} "
              f"{statistics.median(r['tokens_restored'] for r in rs):9.0f} "
              f"{sum(r['errors'] for r in rs):6d}")
    print(f"{'mode':26} {'affected p99 latency s':>24} {'all p99 latency s':>20} "
          f"{'all p99 TTFT s':>17}")
    for mode, rs in runs.items():
        print(f"{mode:26} {spread([percentile(r['affected_latency'], 0.99) for r in rs if r['affected_latency']]):>24} "
              f"{spread([percentile(r['latency'], 0.99) for r in rs]):>20} "
              f"{spread([percentile(r['ttft'], 0.99) for r in rs]):>17}")
    base = runs.get("restart")
    if base:
        for mode, rs in runs.items():
            if mode == "restart":
                continue
            mttr = [b["mttr_s"] / k["mttr_s"] for k, b in zip(rs, base) if k["mttr_s"] and b["mttr_s"]]
            nxt = [_median(b["next_token_s"]) / _median(k["next_token_s"]) for k, b in zip(rs, base)
                   if k["next_token_s"] and b["next_token_s"]]
            print(f"restart / {mode}, per run: MTTR {spread(mttr, digits=1)}x, "
                  f"time to next token {spread(nxt, digits=1)}x")


def report_overhead(latency: dict[str, list[dict]], throughput: dict[str, list[dict]]) -> None:
    on, off = "kevlarflow", "kevlarflow-no-replication"
    print("\nfault-free cost of replication (on vs off, same trace):")
    for mode in (on, off):
        t, lat = throughput[mode], latency[mode]
        print(f"  {mode:26} throughput {spread([r['tok_s'] for r in t], digits=1)} tok/s, "
              f"latency median {spread([statistics.median(r['latency']) for r in lat])} s, "
              f"p99 {spread([percentile(r['latency'], 0.99) for r in lat])} s")
    tput = [a["tok_s"] / b["tok_s"] for a, b in zip(throughput[on], throughput[off])]
    p99 = [percentile(a["latency"], 0.99) / percentile(b["latency"], 0.99)
           for a, b in zip(latency[on], latency[off])]
    print(f"  on / off, per pair: throughput {spread(tput, digits=3)}x, "
          f"p99 latency {spread(p99, digits=3)}x")
    gbs = [r["replicated_bytes"] / r["elapsed_s"] / 1e9 for r in throughput[on]]
    lags = [lag for r in throughput[on] + latency[on] for lag in r["lag"]]
    if lags:
        print(f"  replication while saturated: {spread(gbs, digits=3)} GB/s; lag over every "
              f"running request and step: median {statistics.median(lags):.0f}, "
              f"p99 {percentile(lags, 0.99):.0f}, max {max(lags)} tokens")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--flavour", default="llama")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--fail-at", type=float, default=12.0, help="seconds into the trace")
    parser.add_argument("--fault", default="kill", choices=["kill", "hang"])
    parser.add_argument("--stage", type=int, default=1, help="stage of instance 0 that fails")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens")
    parser.add_argument("--kv-memory", type=int, default=256 << 20, help="bytes per worker pool")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-repeats", type=int, default=3,
                        help="fault-free on/off pairs (0: skip)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}")

    model = ensure_model(args.preset, args.flavour)
    from kevlarflow.model.config import ModelConfig

    vocab = ModelConfig.from_pretrained(model).vocab_size
    trace = make_trace(args.rate, args.duration, args.prompt_len, args.output_len, vocab)
    fault = (0, args.stage, args.fault, args.fail_at)
    runs = {mode: [] for mode in modes}
    for r in range(args.repeats):
        for mode in modes:  # alternating, so that drift on the machine hits every mode
            print(f"repeat {r + 1}/{args.repeats}: {mode} ({len(trace)} requests, {args.fault} of "
                  f"worker (0, {args.stage}) at {args.fail_at:.0f} s) ...", flush=True)
            runs[mode].append(replay(model, MODES[mode], trace, args, fault))
    where = (f"{args.preset} {args.flavour}, 2 instances x 2 stages, {len(trace)} requests at "
             f"{args.rate}/s; {cpu_model()}; median (min-max) over {args.repeats} runs")
    if args.repeats:
        report_failures(runs, f"{args.fault} of worker (0, {args.stage}) at {args.fail_at:.0f} s; "
                        + where)

    if args.overhead_repeats:
        pair = ("kevlarflow", "kevlarflow-no-replication")
        latency = {m: [] for m in pair}
        throughput = {m: [] for m in pair}
        for r in range(args.overhead_repeats):
            for mode in pair:
                print(f"overhead {r + 1}/{args.overhead_repeats}: {mode} ...", flush=True)
                latency[mode].append(replay(model, MODES[mode], trace, args))
                throughput[mode].append(saturate(model, MODES[mode], trace, args))
        print(f"\n{where}")
        report_overhead(latency, throughput)


if __name__ == "__main__":
    main()
