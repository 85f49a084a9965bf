"""Writes .safetensors files one tensor at a time.

The safetensors library wants every tensor of a file in memory at once; the
format itself only needs the shapes up front (a JSON header of names, dtypes
and byte offsets, then the raw little-endian bytes back to back), so with the
shapes known the tensors can be made and written one by one and memory stays
at one tensor, even for a gigabyte of weights.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Callable, Iterable

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for name, shape in shapes.items():
        end = offset + tensor_bytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned


def write_safetensors(path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                      make_tensor: Callable[[str, tuple[int, ...]], torch.Tensor]) -> int:
    """Writes `shapes` in order, calling make_tensor(name, shape) for each just
    before it is written; returns the bytes written."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this writer copies host bytes")
    header = _header(shapes, dtype)
    with open(path, "wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for name, shape in shapes.items():
            tensor = make_tensor(name, shape).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made {tuple(tensor.shape)}, header says {shape}")
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        return out.tell()


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                max_shard_bytes: int) -> list[dict[str, tuple[int, ...]]]:
    """Splits the tensors, in order, into shards of at most max_shard_bytes
    (a tensor larger than that gets a shard to itself)."""
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    filled = 0
    for name, shape in shapes.items():
        size = tensor_bytes(shape, dtype)
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append({})
            filled = 0
        shards[-1][name] = shape
        filled += size
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face names: model.safetensors, or model-0000i-of-0000n.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def shard_index(shards: Iterable[dict[str, tuple[int, ...]]], file_names: list[str],
                dtype: torch.dtype) -> dict:
    """model.safetensors.index.json: which file holds each tensor."""
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, file_names):
        for name, shape in shard.items():
            weight_map[name] = file_name
            total += tensor_bytes(shape, dtype)
    return {"metadata": {"total_size": total}, "weight_map": weight_map}
