"""What the engine hands back for a request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    tokens_run: int = 0  # see Sequence.tokens_run

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str                   # all text so far
    token_ids: list[int]        # all generated token ids so far
    new_text: str               # text added by this step (for streaming)
    new_token_ids: list[int]    # tokens added by this step
    finished: bool
    finish_reason: str | None   # "stop", "length", "abort" or None while running
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = field(default=None)
