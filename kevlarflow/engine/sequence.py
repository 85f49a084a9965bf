"""A request's state as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"    # not admitted yet, or preempted (its KV was dropped)
    RUNNING = "running"    # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: two requests are never "equal"
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: "SamplingParams"  # noqa: F821
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache; everything past them is computed next.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Hashes of the full blocks of this sequence, for prefix caching.
    block_hashes: list[bytes] = field(default_factory=list)
    # The same two for each named pool, when the sequence's KV lives in several
    # (one per pipeline stage, each worker with its own pool and block ids).
    pool_tables: dict[str, list[int]] = field(default_factory=dict)
    pool_hashes: dict[str, list[bytes]] = field(default_factory=dict)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    # Tokens the model ran for this request, counted when their step's
    # results come back: prompt plus outputs but the last, once each, in a
    # run with no preemption, failure or prefix-cache hit.
    tokens_run: int = 0
    # Filled by the engine: decoded text and per-token logprobs.
    text: str = ""
    logprobs: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output, without concatenating both."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
