"""The seeded fault schedule of a chaos run.

Faults come every `every_s` seconds, each at a random moment of its
interval. Each picks a scenario, then a target from the latest /status:
the cases recovery finds hardest get their share, and when a scenario has
no target at that moment the fault falls back to any live worker.

    any          a worker whose process is up (ready, loading or starting)
    borrowed     a worker some other instance borrows
    replacement  a replacement while it starts or loads
    rebuilding   a member of an instance whose communicator is being built
    rejoining    either end of a move back (catching up or draining)
    two          two workers of different instances, back to back
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

SCENARIOS = {"any": 4, "borrowed": 2, "replacement": 1, "rebuilding": 1, "rejoining": 1,
             "two": 1}


@dataclass
class Fault:
    t_s: float
    scenario: str
    worker: str
    kind: str           # kill or hang
    injected: bool      # the server accepted it (the process was still there)
    detail: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def times(duration_s: float, every_s: float, rng: random.Random) -> list[float]:
    """One moment in each interval of every_s seconds, the first after a quiet
    interval (the deployment serves before it is hit)."""
    out, start = [], every_s
    while start + every_s <= duration_s + 1e-9:
        out.append(start + rng.uniform(0, every_s))
        start += every_s
    return out


def targets(scenario: str, status: dict) -> list[list[str]]:
    """Candidate target sets of a scenario (each one or two worker names)."""
    workers = status["workers"]
    up = [w for w, s in workers.items() if s["state"] in ("ready", "loading", "starting")]
    instances = status["instances"]
    if scenario == "any":
        return [[w] for w in up]
    if scenario == "borrowed":
        return [[w] for i in instances for w in i["borrowed"] if w in up]
    if scenario == "replacement":
        return [[w] for w in up if workers[w]["state"] in ("loading", "starting")]
    if scenario == "rebuilding":
        return [[w] for i in instances if i["phase"] == "building" for w in i["workers"]
                if w in up]
    if scenario == "rejoining":
        return [[w] for i in instances if i["phase"] in ("catching_up", "draining")
                for w in set(i["workers"]) ^ set(i["home"]) if w in up]
    if scenario == "two":
        return [[a, b] for a in up for b in up
                if workers[a]["instance"] < workers[b]["instance"]]
    raise ValueError(f"unknown scenario {scenario!r}")


def choose(rng: random.Random, status: dict) -> tuple[str, list[str]]:
    names, weights = zip(*SCENARIOS.items())
    scenario = rng.choices(names, weights)[0]
    candidates = targets(scenario, status)
    if not candidates:
        scenario, candidates = "any", targets("any", status)
    return scenario, (rng.choice(candidates) if candidates else [])
