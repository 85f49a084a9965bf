"""One deployment, one request trace, one failure schedule, every recovery
mode: KevlarFlow with KV replication, without it, and the restart baseline
of today's stacks, each under the failures and fault-free.

Each run starts a fresh deployment and replays the trace in real time
(Poisson arrivals; ShareGPT-like lengths or a ShareGPT file); a failure is
a real SIGKILL or SIGSTOP of a worker at the same moment of the trace in
every mode. By default the rate is 70% of the deployment's fault-free
capacity, measured first, so that losing a worker matters. The report:
per mode, MTTR, average and p99 latency and TTFT, mean TPOT, requests
failed, goodput and tokens recomputed; the ratios against restart; the
targets; a JSON file with all of it and a PNG timeline per run
(docs/failover-benchmark.md defines every figure and the JSON schema)."""
from kevlarflow.bench.failover.cli import main

__all__ = ["main"]
