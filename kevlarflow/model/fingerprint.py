"""What identifies a checkpoint, cheaply: the shape of the model its config
describes, and a hash of each weight file's size, safetensors header (names,
dtypes, shapes and offsets of every tensor) and first and last MiB of tensor
data. Two hosts that hold different checkpoints at the same path, or another
version of one (the same shapes, trained on), differ here; a few MiB per file
are read, not the weights."""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict
from pathlib import Path

from kevlarflow.model.config import ModelConfig

# The fields of ModelConfig that change what a worker computes.
_COMPARED = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
             "num_heads", "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta",
             "max_position_embeddings", "tie_word_embeddings", "attention_bias", "rope_scaling",
             "sliding_windows")
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own bound
SAMPLE_BYTES = 1 << 20


def fingerprint(path: str | Path) -> dict:
    """{"config": {field: value}, "weights": hex digest}."""
    path = Path(path)
    cfg = asdict(ModelConfig.from_pretrained(path))
    digest = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors file")
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"{file}: safetensors header of {n} bytes")
            header = f.read(n)
            head = f.read(SAMPLE_BYTES)
            size = file.stat().st_size
            f.seek(max(8 + n, size - SAMPLE_BYTES))
            tail = f.read(SAMPLE_BYTES)
        digest.update(file.name.encode() + b"\0" + str(size).encode() + b"\0")
        for part in (header, head, tail):
            digest.update(len(part).to_bytes(8, "little") + part)
    return {"config": {k: cfg[k] for k in _COMPARED}, "weights": digest.hexdigest()}


def encode(fp: dict) -> str:
    return json.dumps(fp, sort_keys=True)


def differences(mine: dict, theirs: dict) -> list[str]:
    """What differs, in words ("hidden_size 128 here, 256 there"); [] if none."""
    out = []
    for key in sorted(set(mine.get("config", {})) | set(theirs.get("config", {}))):
        a, b = mine.get("config", {}).get(key), theirs.get("config", {}).get(key)
        if a != b:
            out.append(f"{key} {a!r} here, {b!r} there")
    if mine.get("weights") != theirs.get("weights"):
        out.append("the weight files differ (their safetensors headers or sizes, or their data)")
    return out
