"""Which device a model runs on, refused with a reason when it cannot."""
from __future__ import annotations

import argparse
import re

import torch


def resolve_device(device: str) -> torch.device:
    """"cpu", "cuda" (the current GPU) or "cuda:K"; a ValueError that says why
    otherwise: no CUDA build of torch, no GPU visible, no GPU of that index."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:K', got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    if torch.version.cuda is None:
        raise ValueError(f"device={device!r} needs a CUDA build of torch; this one "
                         f"({torch.__version__}) has no CUDA")
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"device={device!r}: torch {torch.__version__} sees no GPU "
                         "(is CUDA_VISIBLE_DEVICES empty, or the driver missing?)")
    resolved = torch.device(device if ":" in device else f"cuda:{torch.cuda.current_device()}")
    if resolved.index >= count:
        raise ValueError(f"device={device!r} does not exist: {count} GPU(s) visible "
                         f"(cuda:0 to cuda:{count - 1})")
    return resolved


def device_option(text: str) -> str:
    """An argparse type for --device: the text, if this process can use it."""
    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def check_fits(device: torch.device, weight_bytes: int, kv_bytes: int, what: str) -> None:
    """Refuse, before anything is loaded, weights and a KV pool that the
    GPU's free memory cannot hold."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    need = weight_bytes + kv_bytes
    if need > free:
        gib = 1 << 30
        raise ValueError(f"{what} needs {need / gib:.2f} GiB on {device} ({weight_bytes / gib:.2f} "
                         f"GiB of weights, {kv_bytes / gib:.2f} GiB of KV cache) but only "
                         f"{free / gib:.2f} of its {total / gib:.2f} GiB are free")
