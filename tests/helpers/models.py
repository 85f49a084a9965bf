"""Tiny checkpoints written once per test session, shared by the engine tests."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from kevlarflow.model.make_model import make_model

_ROOT = Path(tempfile.mkdtemp(prefix="kevlarflow-models-"))
_OWNER = os.getpid()


@atexit.register
def _remove_root() -> None:
    # Only by the process that made it: a forked child inherits this handler.
    if os.getpid() == _OWNER:
        shutil.rmtree(_ROOT, ignore_errors=True)


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
