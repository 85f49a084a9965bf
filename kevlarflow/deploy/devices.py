"""Which device each worker of a deployment runs on.

Slots are numbered instance by instance (slot = instance * pp_size + stage).
A deployment on "cuda" spreads its workers round-robin over the visible GPUs
unless it is given one device per slot; fewer GPUs than workers is allowed
(several workers share a GPU, which is how one GPU runs a whole deployment)
and the controller says so in its log (sharing_note)."""
from __future__ import annotations

import re

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def slot_devices(device: str, num_slots: int, visible_gpus: int,
                 devices: tuple[str, ...] | None = None) -> list[str]:
    """One device per slot: "cpu" or "cuda:K". A ValueError says why not."""
    if devices is not None:
        devices = tuple(devices)
        if len(devices) != num_slots:
            raise ValueError(f"devices names {len(devices)} device(s) for {num_slots} workers "
                             "(one per slot, instance by instance)")
        for d in devices:
            if not isinstance(d, str) or not _DEVICE.fullmatch(d) or d == "cuda":
                raise ValueError(f"devices must each be 'cpu' or 'cuda:K', got {d!r}")
            if d != "cpu" and int(d.split(":")[1]) >= visible_gpus:
                raise ValueError(f"devices names {d}, but {visible_gpus} GPU(s) are visible")
        chosen = list(devices)
    elif device == "cpu":
        return ["cpu"] * num_slots
    elif device == "cuda":
        if visible_gpus < 1:
            raise ValueError("device='cuda' but no GPU is visible")
        chosen = [f"cuda:{slot % visible_gpus}" for slot in range(num_slots)]
    else:
        raise ValueError(f"a deployment's device is 'cpu' or 'cuda' (per-slot GPUs go in "
                         f"devices), got {device!r}")
    return chosen


def sharing_note(devices: list[str]) -> str | None:
    """A line for the log when workers share GPUs; None when they do not."""
    on_gpus = [d for d in devices if d != "cpu"]
    if len(set(on_gpus)) == len(on_gpus):
        return None
    return (f"{len(on_gpus)} workers share {len(set(on_gpus))} GPU(s): links between workers "
            "on one GPU go over Gloo through host memory (NCCL takes one rank per GPU)")
