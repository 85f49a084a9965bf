"""Timing that reports a distribution, not one number: the machines are shared
and noisy, so every figure is a median with its spread over repeats."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Timing:
    samples: list[float]  # seconds per call

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) over repeats."""
        return min(self.samples), max(self.samples)


def measure(fn: Callable[[], object], repeats: int = 7, warmup: int = 1,
            sync: Callable[[], None] = lambda: None) -> Timing:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return Timing(samples)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Time several candidates round-robin so that background noise hits each
    of them alike; ratios between them are then meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(s) for name, s in samples.items()}


def cpu_model() -> str:
    """The processor's name, for the line that says where a figure was measured."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
