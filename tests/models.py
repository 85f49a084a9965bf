"""Tiny checkpoints written once per test session, shared by the engine tests."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from kevlarflow.model.make_model import make_model

_ROOT = Path(tempfile.mkdtemp(prefix="kevlarflow-models-"))


@functools.cache
def tiny_model(flavour: str = "llama", seed: int = 0) -> str:
    path = _ROOT / f"tiny-{flavour}-{seed}"
    make_model(path, preset="tiny", flavour=flavour, seed=seed)
    return str(path)
