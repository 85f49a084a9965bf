"""Per-request sampling parameters, validated once when the request arrives.

Semantics follow vLLM's SamplingParams, so that clients written against an
OpenAI-style server behave the same here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

MAX_LOGPROBS = 20
# Temperatures below this are treated as greedy: dividing logits by them would
# overflow float32, and the distribution is already a point mass.
GREEDY_TEMPERATURE = 1e-5
# What torch.Generator.manual_seed accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _is_int(value) -> bool:
    # bool is an Integral too, but max_tokens=True is a client bug, not 1.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _require(ok: bool, field: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} must be {rule}, got {value!r}")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None  # normalized to a list
    stop_token_ids: list[int] | None = None  # normalized to a list
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per token besides the sampled one's
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1,
                 "max_tokens", "an int >= 1", self.max_tokens)
        _require(_is_real(self.temperature) and math.isfinite(self.temperature)
                 and self.temperature >= 0, "temperature", "a finite number >= 0", self.temperature)
        _require(_is_int(self.top_k) and self.top_k >= -1,
                 "top_k", "an int >= -1 (0 or -1 turn it off)", self.top_k)
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1,
                 "top_p", "a number in (0, 1]", self.top_p)
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1,
                 "min_p", "a number in [0, 1]", self.min_p)
        _require(self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
                 "seed", "None or an int in [-2**63, 2**64 - 1]", self.seed)
        _require(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]", self.logprobs)
        for flag in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _require(isinstance(getattr(self, flag), bool), flag, "a bool", getattr(self, flag))

        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.stop = self._normalized_stop(self.stop)
        self.stop_token_ids = self._normalized_stop_token_ids(self.stop_token_ids)

    @staticmethod
    def _normalized_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        _require(isinstance(stop, (list, tuple)), "stop", "None, a string or a list of strings", stop)
        for s in stop:
            _require(isinstance(s, str) and s != "", "stop", "a list of non-empty strings", stop)
        return list(stop)

    @staticmethod
    def _normalized_stop_token_ids(ids) -> list[int]:
        if ids is None:
            return []
        _require(isinstance(ids, (list, tuple)), "stop_token_ids", "None or a list of ints >= 0", ids)
        for i in ids:
            _require(_is_int(i) and i >= 0, "stop_token_ids", "a list of ints >= 0", ids)
        return [int(i) for i in ids]

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature (about) 0, or top-k keeping only the best token."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
