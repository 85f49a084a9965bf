"""Request bodies of the OpenAI-compatible API (pydantic models).

Types are strict (no "5" for 5, no true for 1). Fields that clients commonly
send but this server does not implement are accepted at their neutral value
and refused (400) otherwise: best_of (None or n), presence_penalty and
frequency_penalty (0), repetition_penalty (1), logit_bias (empty), echo
(false), suffix (empty), tools (empty), response_format ({"type": "text"}).
user, parallel_tool_calls, and any field not listed here are ignored.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kevlarflow.engine.params import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # choices per request


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _unset(value, info: ValidationInfo):
    """For a field accepted only empty or false: it is not implemented."""
    if value:
        raise ValueError(f"{info.field_name} is not supported")
    return value


def _must_be(value, neutral, what: str):
    if value is not None and value != neutral:
        raise ValueError(f"only {what} is supported")
    return value


class StreamOptions(_Model):
    include_usage: bool = False


class _SamplingFields(_Model):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Each choice (each streamed chunk) also carries the ids of its tokens.
    return_token_ids: bool = False
    user: Optional[str] = None
    # Accepted at their neutral value only.
    best_of: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        return _must_be(v, 0, "0 (penalties are not implemented)")

    @field_validator("repetition_penalty")
    @classmethod
    def _no_repetition_penalty(cls, v):
        return _must_be(v, 1, "1 (penalties are not implemented)")

    _no_logit_bias = field_validator("logit_bias")(_unset)

    def check_best_of(self) -> None:
        if self.best_of is not None and self.best_of not in (1, self.n) or \
                (self.best_of == 1 and self.n != 1):
            from kevlarflow.server.errors import APIError
            raise APIError(400, "best_of must be unset or equal to n (best-of sampling is not "
                                "implemented)", param="best_of")

    def sampling_params(self, index: int, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The params of choice `index`; seeds of n > 1 choices are seed + index."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # A list of prompts (batching) is refused with a 400, except a list of one.
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None

    _no_echo = field_validator("echo", "suffix")(_unset)

    def single_prompt(self) -> str | list[int]:
        from kevlarflow.server.errors import APIError
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "a list of several prompts is not supported: send one "
                                    "request per prompt", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return prompt


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Model):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Literal["none", "auto"]] = None
    parallel_tool_calls: Optional[bool] = None

    _no_tools = field_validator("tools")(_unset)

    def engine_logprobs(self) -> int | None:
        from kevlarflow.server.errors import APIError
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class FaultRequest(_Model):
    instance: int = Field(ge=0)
    stage: int = Field(ge=0)
    kind: Literal["kill", "hang"] = "kill"
