"""The deployment under test: a real `kevlarflow serve` process, started
and stopped as a user would, and the resources of its process tree."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Usage:
    """One sample of the controller process and its workers."""
    t_s: float
    rss_mb: float       # the controller (the server process)
    threads: int
    fds: int
    workers: dict       # pid -> (threads, fds)


class Server:
    def __init__(self, model: str, instances: int, pp: int, serve_args: list[str], log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kevlarflow", "serve", model, "--port", str(self.port),
               "--instances", str(instances), "--pp", str(pp), "--enable-fault-injection",
               "--log-level", "warning", *serve_args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.ps = psutil.Process(self.proc.pid)

    def wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kevlarflow serve exited with code {self.proc.returncode} "
                                   f"while starting (its log: {self.log.name})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"kevlarflow serve not healthy within {timeout_s:.0f} s "
                           f"(its log: {self.log.name})")

    def descendants(self) -> list[psutil.Process]:
        try:
            return self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def usage(self, t_s: float) -> Usage | None:
        try:
            with self.ps.oneshot():
                rss, threads, fds = self.ps.memory_info().rss, self.ps.num_threads(), \
                    self.ps.num_fds()
        except psutil.NoSuchProcess:
            return None
        workers = {}
        for child in self.descendants():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    workers[child.pid] = (child.num_threads(), child.num_fds())
            except psutil.NoSuchProcess:
                pass
        return Usage(t_s, rss / 2 ** 20, threads, fds, workers)

    def stop(self, grace_s: float) -> dict:
        """SIGTERM, as an orchestrator stops a server; what it took, how it
        ended, and which of its processes outlived it."""
        tree = [self.ps] + self.descendants()
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            code = None
            self.proc.kill()
            self.proc.wait()
        took = time.monotonic() - start
        _, alive = psutil.wait_procs(tree[1:], timeout=2.0)
        orphans = [p.pid for p in alive if _running(p)]
        for p in alive:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        with open(self.log.name, errors="replace") as log:
            tracebacks = log.read().count("Traceback (most recent call last)")
        return dict(exit_code=code, stop_s=took, orphans=orphans, tracebacks=tracebacks)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
