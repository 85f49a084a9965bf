"""Runs the n choices of one API request on the engine, and the pieces of
its OpenAI answer (answers.py puts them together)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from kevlarflow.engine.async_engine import EngineDeadError
from kevlarflow.engine.outputs import RequestOutput
from kevlarflow.deploy.router import NoInstanceServing
from kevlarflow.server.errors import APIError

_END = object()


async def merged(engine, prompt_ids: list[int], params: list, request_id: str
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) as they come, from one engine request per choice.
    Closing this iterator (or cancelling its consumer) aborts every choice."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, p) -> None:
        try:
            async for out in engine.generate(list(prompt_ids), p, f"{request_id}-{index}"):
                queue.put_nowait((index, out))
        except Exception as error:  # noqa: BLE001 (handed to the consumer)
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def api_error_of(error: Exception) -> APIError:
    """What the client is told about an exception from the engine."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    if isinstance(error, NoInstanceServing):
        return APIError(503, "no pipeline instance is serving; retry once a replacement "
                             "worker has joined", code="no_instance_serving")
    if isinstance(error, EngineDeadError):
        return APIError(503, f"the engine is not running: {error}", code="engine_dead")
    return APIError(503, f"the engine failed this request: {error}", code="engine_error")


ENGINE_FAILED = ("the request failed in the engine (a worker failure left no instance to "
                 "finish it); retry it")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class Choices:
    """What a request's choices produced so far."""
    n: int
    last: list = field(default_factory=list)
    logprobs_sent: list = field(default_factory=list)

    def __post_init__(self):
        self.last = [None] * self.n
        self.logprobs_sent = [0] * self.n

    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.last if o is not None)


class TokenText:
    """Text of single tokens for logprobs, cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def completion_logprobs(entries, token_text: TokenText, offset: int = 0) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text = token_text(e.token_id)
        tokens.append(text)
        lps.append(e.logprob)
        tops.append({token_text(t): lp for t, lp in (e.top or [])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries, token_text: TokenText) -> dict:
    def one(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(one(e.token_id, e.logprob),
                             top_logprobs=[one(t, lp) for t, lp in (e.top or [])])
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
