"""Where an instance runs after a change of membership, and what its requests
keep of their KV when a stage moves to another worker."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kevlarflow.engine.block_manager import BlockManager


def plan_route(home: list[str], current: list[str], ready: Callable[[str], bool],
               backup_of: Callable[[str], str | None],
               lenders: list[list[str]]) -> tuple[list[str] | None, int | None]:
    """The worker of each stage: the instance's own where it is ready; else
    the worker it borrows already, if that is ready; else the backup of the
    worker it ran on (which holds replicas of its KV), else the first ready
    lender (lenders[s]: the other instances' own workers of stage s).
    Returns (route, None), or (None, s) when stage s has no ready worker."""
    route = []
    for s, own in enumerate(home):
        if ready(own):
            route.append(own)
            continue
        backup = backup_of(current[s])
        candidates = [current[s]] + ([backup] if backup else []) + lenders[s]
        donor = next((w for w in candidates if w != own and ready(w)), None)
        if donor is None:
            return None, s
        route.append(donor)
    return route, None


@dataclass
class KVMove:
    """What a switch of workers did to the KV of an instance's requests."""
    requests: int = 0
    requests_restored: int = 0  # requests that keep some KV
    restored: int = 0           # tokens whose KV the new workers hold
    recomputed: int = 0         # tokens to compute again

    def __str__(self) -> str:
        return f"{self.requests} requests keep {self.restored} tokens of KV, " \
               f"recompute {self.recomputed}"


def move_kv(inst, route: list[str], pools: dict[str, BlockManager], replication,
            moved: Callable[[str, int, int], None] | None = None) -> KVMove:
    """Switch inst to the workers of route. At a stage whose worker changes,
    the new worker takes over its replicas of the old one (its backup's
    blocks become live blocks); every running request then recomputes from
    the fewest tokens any stage kept. moved(request id, computed, kept) is
    told of each request."""
    seqs = list(inst.scheduler.running)
    kept = {seq: seq.num_computed_tokens for seq in seqs}
    for old, new in zip(inst.workers, route):
        if old == new:
            continue
        for seq, tokens in replication.take_over(old, new, seqs).items():
            kept[seq] = min(kept[seq], tokens)
        for seq in seqs:  # old is dead, or keeps serving other requests only
            pools[old].free_sequence(seq)
            replication.forget_on(old, seq)
    inst.use_workers(route, [pools[w] for w in route])
    move = KVMove(requests=len(seqs))
    for seq in seqs:
        if moved is not None:
            moved(seq.request_id, seq.num_computed_tokens, kept[seq])
        move.recomputed += seq.num_computed_tokens - kept[seq]
        move.restored += kept[seq]
        move.requests_restored += bool(kept[seq])
        seq.num_computed_tokens = kept[seq]
    return move
