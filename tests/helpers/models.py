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


# Prompts of every shape the engine tests need: one token, unicode, long enough
# to be chunked.
PROMPTS = [
    "the quick brown fox",
    "a",
    "hello world, this is a longer prompt with several words in it and then some more",
    "numbers 1 2 3 4 5 6 7 8 9 10 11 12",
    "héllo wörld ✓",
]
