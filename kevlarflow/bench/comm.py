"""Recovery latency of the communicator manager on CPU gloo: abort + shrink +
first collective, each round a real shrink among real processes.

Per round, with n survivors and one more process: everyone builds the full
group (not timed); one member (a different one each round) aborts its
communicator, closing its connections as a crash would, and publishes that
it left; the survivors then time abort -> shrink(excluded=[it]) -> first
allreduce. A round's figure is its slowest survivor (the group is back when
the last one is). Failure detection is not included: that is the op
deadline, or a closed connection. Usage: python bench/comm.py [--rounds 20]
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from kevlarflow.bench.timing import cpu_model

GROUP = "bench"
TIMEOUT = datetime.timedelta(seconds=120)


def _worker(me: str, members: list[str], rounds: int, port: int, results) -> None:
    torch.set_num_threads(1)
    from kevlarflow.comm.manager import CommManager

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    mgr = CommManager(store, me, deadline_s=5.0)
    x = torch.ones(1024)
    generation = 0
    try:
        for r in range(rounds):
            # Every process knows the round's generations: two per round.
            mgr.build(GROUP, members, generation=generation, deadline_s=60.0)
            mgr.allreduce(GROUP, x)
            leaver = members[r % len(members)]
            if me == leaver:
                mgr.abort(GROUP)
                store.set(f"left/{r}", "1")
            else:
                store.wait([f"left/{r}"])
                t0 = time.perf_counter()
                mgr.abort(GROUP)
                t1 = time.perf_counter()
                mgr.shrink(GROUP, [leaver], deadline_s=60.0)
                t2 = time.perf_counter()
                mgr.allreduce(GROUP, x)
                t3 = time.perf_counter()
                results.put((r, me, t1 - t0, t2 - t1, t3 - t2, t3 - t0))
            generation += 2
            store.add(f"done/{r}", 1)
            store.wait([f"round/{r + 1}"])
    finally:
        mgr.close()


def run(survivors: int, rounds: int) -> list[tuple]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    members = [f"w0.{i}" for i in range(survivors + 1)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(me, members, rounds, store.port, results),
                         daemon=True) for me in members]
    for p in procs:
        p.start()
    rows = []
    try:
        for r in range(rounds):
            # The next round starts once every process finished this one.
            while store.add(f"done/{r}", 0) < len(members):
                if not all(p.is_alive() for p in procs):
                    raise RuntimeError("a benchmark worker died")
                time.sleep(0.005)
            store.set(f"round/{r + 1}", "1")
        for _ in range(rounds * survivors):
            rows.append(results.get(timeout=60))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    return rows


def _ms(xs) -> str:
    return f"{statistics.median(xs) * 1e3:7.1f} ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--survivors", type=int, nargs="+", default=[2, 3, 4])
    args = ap.parse_args(argv)
    print(f"command: python bench/comm.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo over loopback")
    print(f"{args.rounds} rounds each; per round the slowest survivor; median (min-max), ms\n")
    print(f"{'ranks after shrink':>18} | {'abort+shrink+allreduce':>24} | {'abort':>18} | "
          f"{'shrink':>20} | {'first allreduce':>18}")
    for n in args.survivors:
        rows = run(n, args.rounds)
        by_round: dict[int, list[tuple]] = {}
        for row in rows:
            by_round.setdefault(row[0], []).append(row)
        worst = [max(rs, key=lambda row: row[5]) for rs in by_round.values()]
        print(f"{f'{n} (from {n + 1})':>18} | {_ms([w[5] for w in worst]):>24} | "
              f"{_ms([w[2] for w in worst]):>18} | {_ms([w[3] for w in worst]):>20} | "
              f"{_ms([w[4] for w in worst]):>18}")


if __name__ == "__main__":
    main()
