"""The figures of a run, defined as the real failover benchmark defines them:
latency = last token - arrival, TTFT = first token - arrival, TPOT =
(latency - TTFT) / (tokens - 1) over requests of two tokens or more, p99 =
the value at index min(n - 1, int(0.99 n)) of the sorted values."""
from __future__ import annotations

from kevlarflow.bench.failover.metrics import mean, percentile

METRICS = ("mttr_s", "avg_latency_s", "p99_latency_s", "avg_ttft_s", "p99_ttft_s", "mean_tpot_s")
RATIO_METRICS = ("mttr_s", "avg_latency_s", "p99_latency_s", "avg_ttft_s", "p99_ttft_s")


def summarize(requests: list[dict], mttr_s: float | None, tokens_recomputed: int) -> dict:
    """requests: dicts of arrival_s, first_s, last_s (None: never finished), tokens."""
    done = [r for r in requests if r["last_s"] is not None]
    latency = [r["last_s"] - r["arrival_s"] for r in done]
    ttft = [r["first_s"] - r["arrival_s"] for r in done]
    tpot = [(r["last_s"] - r["first_s"]) / (r["tokens"] - 1) for r in done if r["tokens"] >= 2]
    return dict(mttr_s=mttr_s, avg_latency_s=mean(latency), p99_latency_s=percentile(latency, 0.99),
                avg_ttft_s=mean(ttft), p99_ttft_s=percentile(ttft, 0.99), mean_tpot_s=mean(tpot),
                requests=len(requests), requests_failed=len(requests) - len(done),
                tokens_recomputed=tokens_recomputed)
