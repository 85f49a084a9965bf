"""A deployment under a stream of faults, checked against every promise.

`kevlarflow serve` runs a deployment (default: the small preset, 2 instances
x 2 stages) with fault injection on; streaming clients keep it busy while a
seeded schedule kills (SIGKILL) or hangs (SIGSTOP) one of its workers every
few seconds: any worker, at any moment, with a share of the hard cases (the
borrowed worker, a replacement while it loads, a member of a communicator
being built, either end of a move back, two instances at once). Afterwards
every request is compared with the failure-free output of the in-process
engine, and the run's invariants are checked (see checks.py): exact outputs,
no token missing or repeated, failures only while a stage has no live
worker, recovery within a few seconds of the last fault, /health "ok" and
every slot on its own worker at the end, idle pools empty, no leaked
process, thread or file descriptor, bounded controller memory, a clean stop.

    kevlarflow bench chaos --duration 150 --fault-every 5

It prints a one-screen summary, writes chaos.json and chaos-timeline.png to
--out, and exits with 1 if an invariant broke."""
from kevlarflow.bench.chaos.cli import main

__all__ = ["main"]
