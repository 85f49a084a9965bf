"""The simulated trace, and the load that a deployment can carry.

Traces come from the real benchmark's generator (kevlarflow.bench.trace):
the same Poisson arrivals and log-normal lengths. Only lengths matter here,
and drawing every prompt's token ids would take longer than a whole
simulation of a large trace, so large traces draw the lengths alone: the
same distributions, though for a given seed not the same sample as the real
benchmark's (--validate replays a recorded trace exactly)."""
from __future__ import annotations

import random

from kevlarflow.bench import trace as real_trace
from kevlarflow.bench.sim.costs import Costs
from kevlarflow.bench.sim.model import TraceRequest

EXACT_LIMIT_TOKENS = 200_000  # expected prompt tokens up to which ids are drawn as the real one does


def sharegpt_like(rate: float, duration_s: float, mean_prompt: int, mean_output: int,
                  vocab_size: int = 32000, seed: int = 0) -> list[TraceRequest]:
    if rate * duration_s * mean_prompt <= EXACT_LIMIT_TOKENS:
        return [TraceRequest(r.arrival_s, len(r.prompt), r.output_len) for r in
                real_trace.sharegpt_like(rate, duration_s, mean_prompt, mean_output,
                                         vocab_size, seed)]
    if mean_prompt < real_trace.MIN_TOKENS or mean_output < real_trace.MIN_TOKENS:
        raise ValueError(f"mean lengths must be at least {real_trace.MIN_TOKENS} tokens")
    rng = random.Random(seed)
    draw = real_trace.lognormal_length
    return [TraceRequest(t, draw(rng, mean_prompt), draw(rng, mean_output))
            for t in real_trace.arrivals(rate, duration_s, rng)]


def capacity_requests_per_s(costs: Costs, mean_prompt: int, mean_output: int,
                            seed: int = 0, requests: int = 3000) -> float:
    """Fault-free capacity, found by simulation: `requests` of the trace's
    lengths all arrive at once, and the rate at which the middle 80% of them
    finish is what the deployment sustains (the start and the tail, where
    the batch fills or drains, are left out)."""
    from kevlarflow.bench.sim.model import simulate

    lengths = sharegpt_like(1000.0, requests / 1000.0, mean_prompt, mean_output, seed=seed)
    burst = [TraceRequest(0.0, r.prompt_tokens, r.output_tokens) for r in lengths]
    done = sorted(r["last_s"] for r in simulate(costs, burst, "kevlarflow").requests())
    lo, hi = done[len(done) // 10], done[(9 * len(done)) // 10]
    return (0.8 * len(done)) / (hi - lo)
