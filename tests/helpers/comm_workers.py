"""Worker processes for the communicator tests and benchmark.

Each worker is a real process (multiprocessing "spawn") with one thread, a
client of the TCPStore hosted by the parent, and one CommManager. It runs a
scenario function and reports its result, or its traceback, on a queue.
Processes coordinate through store keys, never through sleeps.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

import torch
import torch.distributed as dist

STORE_TIMEOUT = datetime.timedelta(seconds=60)
# Building waits for every member to start (a spawned process imports torch
# first), so it gets a generous deadline; ops get a short one.
BUILD_DEADLINE_S = 30.0


def _worker(scenario, me, members, port, results, kwargs):
    torch.set_num_threads(1)
    from kevlarflow.comm.manager import CommManager

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=STORE_TIMEOUT)
    mgr = CommManager(store, me, deadline_s=kwargs.pop("deadline_s", 2.0))
    try:
        results.put((me, "ok", scenario(mgr, store, me, members, **kwargs)))
    except BaseException:
        results.put((me, "error", traceback.format_exc()))
    finally:
        mgr.close()


class Workers:
    """n worker processes running `scenario`; use as a context manager, which
    kills and joins every process on the way out."""

    def __init__(self, n: int, scenario, **kwargs):
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=STORE_TIMEOUT)
        self.members = [f"w0.{i}" for i in range(n)]
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.procs = {
            me: ctx.Process(target=_worker, daemon=True,
                            args=(scenario, me, self.members, self.store.port, self.results,
                                  dict(kwargs)))
            for me in self.members
        }

    def __enter__(self):
        for p in self.procs.values():
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self.procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)  # works on a stopped process too
        for p in self.procs.values():
            p.join(10)
        self.results.close()
        self.results.join_thread()

    def wait_keys(self, keys, timeout_s: float = 60.0) -> None:
        self.store.wait(list(keys), datetime.timedelta(seconds=timeout_s))

    def signal(self, me: str, sig) -> None:
        os.kill(self.procs[me].pid, sig)

    def collect(self, who, timeout_s: float = 60.0) -> dict:
        """Results of the workers in `who`; raises on a worker's error."""
        out, end = {}, time.monotonic() + timeout_s
        while set(out) != set(who):
            try:
                me, status, value = self.results.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no result from {sorted(set(who) - set(out))} "
                                   f"within {timeout_s} s") from None
            if status != "ok":
                raise AssertionError(f"worker {me} failed:\n{value}")
            out[me] = value
        return out

    def exitcodes(self, who, timeout_s: float = 20.0) -> dict:
        for me in who:
            self.procs[me].join(timeout_s)
        return {me: self.procs[me].exitcode for me in who}


def error_name(e: BaseException) -> str:
    return type(e).__name__
