"""Which backend connects a group, chosen from where its members run.

NCCL links GPUs directly, but only when every member has a GPU of its own:
NCCL refuses two ranks on one device ("Duplicate GPU detected"), and it needs
a working NCCL library at each member. Everything else goes over Gloo, with
tensors on a GPU staged through pinned host memory (comm/staging.py); a
deployment asks for that everywhere with transport="gloo" (clusters without
NCCL-capable networking)."""
from __future__ import annotations

from dataclasses import dataclass

TRANSPORTS = ("auto", "gloo")


@dataclass(frozen=True)
class Placement:
    """Where a member runs: its host, its device ("cpu" or "cuda:K") and
    whether NCCL works in its process."""
    host: str
    device: str
    nccl: bool


def choose_backend(members: list[Placement], transport: str = "auto") -> tuple[str, str]:
    """("nccl" or "gloo", why) for a group of these members."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "gloo":
        return "gloo", "the deployment asks for gloo"
    if any(m.device == "cpu" for m in members):
        return "gloo", "a member runs on the CPU"
    gpus = [(m.host, m.device) for m in members]
    if len(set(gpus)) < len(gpus):
        return "gloo", "members share a GPU"
    if not all(m.nccl for m in members):
        return "gloo", "NCCL is unavailable at a member"
    return "nccl", "every member has a GPU of its own"
