"""What recovery may read and do on the controller (the controller
implements it: ft never reaches into its internals), and what recovery
counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

MAX_MOVES = 10_000         # moves remembered per request id (most recent)


class DeploymentView(Protocol):
    """The controller as recovery sees it."""
    config: object              # DeploymentConfig
    instances: list             # PipelineInstance, by index
    workers: object             # WorkerTable
    pools: dict                 # worker -> BlockManager
    replication: object         # Replication
    events: object              # EventLog

    def build(self, inst, route: list[str]) -> None:
        """A new generation of inst's communicator over route (inst.workers)."""

    def abort_generation(self, inst, reason: str) -> None:
        """Stop inst's current generation, built or being built, everywhere."""

    def fail_requests(self, inst, reason: str) -> None:
        """inst's requests end with an error."""

    def discard(self, name: str) -> None:
        """The slot's process is gone or must go: forget it, kill it if it runs."""

    def spawn(self, name: str) -> bool:
        """Start a process for the slot; False when this controller starts none."""


@dataclass
class RecoveryStats:
    tokens_restored: int = 0
    tokens_recomputed: int = 0
    requests_restored: int = 0
    # request id -> (tokens computed, tokens of KV kept) at its last move
    moves: dict[str, tuple[int, int]] = field(default_factory=dict)

    def moved(self, request_id: str, computed: int, kept: int) -> None:
        self.moves.pop(request_id, None)
        self.moves[request_id] = (computed, kept)
        while len(self.moves) > MAX_MOVES:
            del self.moves[next(iter(self.moves))]
