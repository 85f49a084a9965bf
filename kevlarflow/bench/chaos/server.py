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

    def workers_in_detail(self) -> dict:
        """Per worker (by slot): its threads by name and the workers its TCP
        connections reach. What a failed leak check needs to name what was
        left over: each Gloo group holds a loop thread, two run-loop threads
        and a connection to each peer."""
        procs = {p.pid: p for p in self.descendants()}
        slots, conns, owner = {}, {}, {}
        for pid, p in procs.items():
            try:
                cmd = p.cmdline()
                slots[pid] = (f"w{cmd[cmd.index('--instance') + 1]}."
                              f"{cmd[cmd.index('--stage') + 1]}" if "--instance" in cmd
                              else f"pid {pid}")
                conns[pid] = [c for c in p.net_connections(kind="tcp")
                              if c.status == psutil.CONN_ESTABLISHED and c.raddr]
            except (psutil.Error, ValueError, IndexError):
                continue
            owner.update({c.laddr.port: pid for c in conns[pid]})
        detail = {}
        for pid, cs in conns.items():
            threads: dict[str, int] = {}
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        name = f.read().strip()
                    threads[name] = threads.get(name, 0) + 1
            except OSError:
                pass
            peers: dict[str, int] = {}
            for c in cs:
                peer = slots.get(owner.get(c.raddr.port), "other")
                peers[peer] = peers.get(peer, 0) + 1
            detail[slots[pid]] = dict(pid=pid, threads=threads, peers=peers)
        return detail

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
