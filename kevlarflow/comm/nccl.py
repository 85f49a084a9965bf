"""Connecting a generation of an NCCL communicator.

Rank 0 of the new member list draws a fresh ncclUniqueId and publishes it
under the generation's own store prefix; the others wait for it there (up
to the deadline), so an id of one generation can never reach another. The
communicator is created on the device given (default: the calling thread's
current one; builds run on threads of their own, whose current device is
not the one the worker set, so a worker names its GPU).
"""
from __future__ import annotations

import datetime

import torch

from kevlarflow import _comm

ID_KEY = "nccl_unique_id"


def unavailable_reason() -> str:
    """"" when the NCCL backend can be used in this process, else why not."""
    reason = _comm.nccl_unavailable_reason()
    if not reason and not torch.cuda.is_available():
        reason = "the NCCL backend needs a CUDA device, and torch sees none"
    return reason


def connect(core, store, group: str, generation: int, rank: int, size: int,
            deadline_s: float, device: int | None = None) -> None:
    if rank == 0:
        store.set(ID_KEY, _comm.nccl_unique_id())
    else:
        store.wait([ID_KEY], datetime.timedelta(seconds=deadline_s))
    unique_id = store.get(ID_KEY)
    if device is None:
        device = torch.cuda.current_device()
    core.install_nccl(group, generation, unique_id, rank, size, device, deadline_s)
