"""Starts worker processes on this machine and makes sure none outlives its
deployment."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from kevlarflow.deploy.join import TOKEN_ENV


class LocalLauncher:
    def __init__(self, controller: str, join_token: str, threads: int = 1,
                 instance_cpus: tuple[tuple[int, ...], ...] | None = None):
        self.controller, self.threads = controller, threads
        self.instance_cpus = instance_cpus
        self._join_token = join_token
        self._exit_fds: dict[int, int] = {}  # pid -> its pidfd
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}

    def spawn(self, instance: int, stage: int) -> subprocess.Popen:
        """A `kevlarflow worker` for slot (instance, stage); it asks for that slot."""
        env = dict(os.environ)
        # Many workers share few cores: each keeps to its own thread budget.
        env["OMP_NUM_THREADS"] = str(self.threads)
        # torch puts its large allocations (weights, KV pools) on transparent
        # huge pages: a killed worker's memory is then freed in a few ms
        # instead of ~100 ms, and its exit, which is how a crash is
        # detected, comes that much sooner.
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        # In the environment, not the command line, which every user can read.
        env[TOKEN_ENV] = self._join_token
        cmd = [sys.executable, "-m", "kevlarflow", "worker", "--controller", self.controller,
               "--instance", str(instance), "--stage", str(stage),
               "--threads", str(self.threads), "--parent-pid", str(os.getpid())]
        if self.instance_cpus:
            cpus = self.instance_cpus[instance % len(self.instance_cpus)]
            cmd += ["--cpus", ",".join(map(str, cpus))]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        self.procs[(instance, stage)] = proc
        self._watch(proc)
        return proc

    def _watch(self, proc: subprocess.Popen) -> None:
        """A pidfd turns readable the moment the process exits (Linux 5.3+):
        a controller waiting for messages wakes at once, no polling."""
        try:
            self._exit_fds[proc.pid] = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # another OS, or an older kernel: polled only
            pass

    def exit_fds(self) -> list[int]:
        """Of the processes still running: readable once one exits, to wake
        a wait on them. (One that exited is left to exited().)"""
        running = {p.pid for p in self.procs.values() if p.poll() is None}
        for pid in [pid for pid in self._exit_fds if pid not in running]:
            os.close(self._exit_fds.pop(pid))
        return list(self._exit_fds.values())

    def kill(self, slot: tuple[int, int]) -> None:
        """Kill the slot's process, if it still runs, and reap it."""
        proc = self.procs.pop(slot, None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def stopped(self, slot: tuple[int, int]) -> bool:
        """The slot's process is stopped (SIGSTOP, job control): it sends no
        heartbeat before it registers, so only this tells such a hang."""
        proc = self.procs.get(slot)
        return proc is not None and _is_stopped(proc)

    def exited(self) -> dict[tuple[int, int], int]:
        """Slots whose process has exited, with its exit code."""
        return {slot: p.returncode for slot, p in self.procs.items() if p.poll() is not None}

    def stop(self, told: set[tuple[int, int]], grace_s: float = 5.0) -> None:
        """Wait up to grace_s for the workers of the slots told to shut down,
        then kill the rest. The others, and a stopped one (SIGSTOP), which
        cannot exit meanwhile, are killed at once."""
        deadline = time.monotonic() + grace_s
        running = dict(self.procs)
        while running and time.monotonic() < deadline:
            for slot, proc in running.items():
                if slot not in told or _is_stopped(proc):
                    proc.kill()
            running = {slot: p for slot, p in running.items() if p.poll() is None}
            if running:
                time.sleep(0.01)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()
        self.exit_fds()  # closes them all


def _is_stopped(proc: subprocess.Popen) -> bool:
    """The process runs but is stopped (SIGSTOP, job control)."""
    if proc.poll() is not None:
        return False
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):  # another OS: only the deadline applies
        return False
