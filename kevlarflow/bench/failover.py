"""One failure under steady load, KevlarFlow's recovery against the restart
baseline, on the same request trace in one run.

Each mode starts a fresh deployment, replays the trace (Poisson arrivals,
seeded lengths) and, at the same moment of the trace, delivers the same fault
to the same worker. Reported per mode: the time to detect the failure, MTTR
(from the failure until the failed instance completes a forward step again),
and for each request that was in flight on the failed instance, the time from
the failure until its next token; then the ratios restart / KevlarFlow.
"resumed" is when the failed instance's communicator was up again (rerouted,
or restarted), before its first step."""
from __future__ import annotations

import argparse
import random
import statistics
import time

from kevlarflow.bench.throughput import ensure_model
from kevlarflow.bench.timing import cpu_model


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


def run_mode(model: str, recovery: str, trace, fail_at_s: float, victim: tuple[int, int, str],
             args) -> dict:
    from kevlarflow import LLM, SamplingParams

    llm = LLM(model, num_instances=2, pp_size=2, recovery=recovery,
              max_num_batched_tokens=args.chunk, kv_cache_memory=256 << 20)
    engine = llm.engine
    try:
        start = time.time()
        pending = list(trace)
        tokens_at: dict[str, list[float]] = {}
        owner_at_failure: dict[str, int] = {}
        failed_at = None
        seqs = []
        while pending or engine.has_unfinished():
            now = time.time()
            while pending and start + pending[0][0] <= now:
                _, prompt, n_out = pending.pop(0)
                seq = engine.add_request(prompt, SamplingParams(max_tokens=n_out, temperature=0,
                                                                ignore_eos=True))
                tokens_at[seq.request_id] = []
                seqs.append(seq)
            if failed_at is None and now - start >= fail_at_s:
                i, s, kind = victim
                owner_at_failure = {q.request_id: engine.owner[q].index for q in seqs
                                    if not q.is_finished}
                engine.inject_fault(i, s, kind)
                failed_at = time.time()
            for out in engine.step(timeout_s=0.02):
                tokens_at[out.request_id].extend([time.time()] * len(out.new_token_ids))
        events = engine.events
        failed = events.of("failed")[0].time
        detected = events.of("detected")[0].time
        recovered = [e.time for e in events.of("first_step_after_failure") if e.instance == victim[0]]
        resumed = [e.time for e in events.of("resumed") if e.instance == victim[0]]
        affected = [rid for rid, inst in owner_at_failure.items() if inst == victim[0]]
        next_token = []
        for rid in affected:
            after = [t for t in tokens_at[rid] if t > failed]
            if after:
                next_token.append(after[0] - failed)
        errors = sum(1 for q in seqs if q.finish_reason == "error")
        return dict(detect_s=detected - failed, mttr_s=(recovered[0] - failed) if recovered else None,
                    resume_s=(resumed[0] - failed) if resumed else None,
                    next_token_s=next_token, affected=len(affected), requests=len(seqs),
                    errors=errors)
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    model = ensure_model(args.preset, args.flavour)
    from kevlarflow.model.config import ModelConfig

    vocab = ModelConfig.from_pretrained(model).vocab_size
    trace = make_trace(args.rate, args.duration, args.prompt_len, args.output_len, vocab)
    victim = (0, args.stage, args.fault)
    runs = {"kevlarflow": [], "restart": []}
    for r in range(args.repeats):
        for mode in runs:  # alternating, so that drift on the machine hits both
            print(f"repeat {r + 1}/{args.repeats}: {mode} ({len(trace)} requests, {args.fault} of "
                  f"worker (0, {args.stage}) at {args.fail_at:.0f} s) ...", flush=True)
            runs[mode].append(run_mode(model, mode, trace, args.fail_at, victim, args))

    def spread(values, scale=1.0, digits=2):
        values = [v * scale for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    def next_token(r):  # the median over the affected requests of one run
        return statistics.median(r["next_token_s"]) if r["next_token_s"] else None

    print(f"\n{args.preset} {args.flavour}, 2 instances x 2 stages, {len(trace)} requests at "
          f"{args.rate}/s, {args.fault} of worker (0, {args.stage}) at {args.fail_at:.0f} s; "
          f"{cpu_model()}; median (min-max) over {args.repeats} runs")
    print(f"{'mode':11} {'detect ms':>18} {'resumed s':>18} {'MTTR s':>18} {'next token s':>18} "
          f"{'affected':>9} {'errors':>7}")
    for mode, rs in runs.items():
        print(f"{mode:11} {spread([r['detect_s'] for r in rs], 1000, 1):>18} "
              f"{spread([r['resume_s'] for r in rs]):>18} "
              f"{spread([r['mttr_s'] for r in rs]):>18} {spread([next_token(r) for r in rs]):>18} "
              f"{sum(r['affected'] for r in rs):9d} {sum(r['errors'] for r in rs):7d}")
    ratios = [b["mttr_s"] / k["mttr_s"] for k, b in zip(runs["kevlarflow"], runs["restart"])
              if k["mttr_s"] and b["mttr_s"]]
    tokens = [next_token(b) / next_token(k) for k, b in zip(runs["kevlarflow"], runs["restart"])
              if next_token(k) and next_token(b)]
    print(f"restart / kevlarflow, per run: MTTR {spread(ratios, digits=1)}x, "
          f"time to next token {spread(tokens, digits=1)}x")


if __name__ == "__main__":
    main()
