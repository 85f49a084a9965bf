"""One API request's outputs as its OpenAI answer: a single JSON body, or a
stream of server-sent-event chunks ending in "data: [DONE]"."""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Callable

from kevlarflow.server import errors
from kevlarflow.server.errors import APIError
from kevlarflow.server.generation import (ENGINE_FAILED, Choices, TokenText, api_error_of,
                                          chat_logprobs, completion_logprobs, sse, usage)


@dataclass
class Answer:
    """What a request being answered holds: its validated body (req), the
    first output (already awaited, so that an error before any token is an
    HTTP error) and the rest of them."""
    req: object                  # CompletionRequest or ChatCompletionRequest
    chat: bool
    request_id: str
    created: int
    model_name: str
    prompt_tokens: int
    first: tuple | None          # (choice index, output), None if there was none
    outputs: AsyncIterator
    token_text: TokenText
    finished: Callable           # called with each choice's final output
    count: Callable[[str], None]  # called with the outcome: "ok", "error"

    def __post_init__(self):
        self.choices = Choices(self.req.n)

    async def _next(self):
        if self.first is not None:
            item, self.first = self.first, None
            return item
        return await self.outputs.__anext__()

    def _logprobs(self, entries):
        return chat_logprobs(entries, self.token_text) if self.chat else \
            completion_logprobs(entries, self.token_text)

    async def body(self) -> dict:
        """Every choice to its end, as one response body."""
        try:
            while True:
                index, out = await self._next()
                self.choices.last[index] = out
                if out.finished:
                    self.finished(out)
        except StopAsyncIteration:
            pass
        except Exception as error:
            self.count("error")
            raise api_error_of(error) from error
        if any(o is None or o.finish_reason == "error" for o in self.choices.last):
            self.count("error")
            raise APIError(503, ENGINE_FAILED, code="engine_error")
        body_choices = []
        for i, out in enumerate(self.choices.last):
            lps = self._logprobs(out.logprobs) if out.logprobs is not None else None
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": out.text},
                          "logprobs": lps, "finish_reason": out.finish_reason}
            else:
                choice = {"index": i, "text": out.text, "logprobs": lps,
                          "finish_reason": out.finish_reason}
            if self.req.return_token_ids:
                choice["token_ids"] = list(out.token_ids)
            body_choices.append(choice)
        self.count("ok")
        return {"id": self.request_id,
                "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": body_choices,
                "usage": usage(self.prompt_tokens, self.choices.completion_tokens())}

    def _base(self) -> dict:
        return {"id": self.request_id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name}

    def _chunk(self, choice: dict) -> str:
        body = dict(self._base(), choices=[choice])
        if self.req.include_usage:
            body["usage"] = None
        return sse(body)

    def _delta(self, index: int, out) -> str | None:
        """The chunk for what out adds to choice index; None if nothing."""
        lps = None
        if out.logprobs is not None:
            new = out.logprobs[self.choices.logprobs_sent[index]:]
            self.choices.logprobs_sent[index] = len(out.logprobs)
            if new:
                lps = self._logprobs(new)
        reason = out.finish_reason if out.finished else None
        ids = self.req.return_token_ids and out.new_token_ids
        if not (out.new_text or reason or lps or ids):
            return None
        if self.chat:
            d = {"content": out.new_text} if out.new_text else {}
            choice = {"index": index, "delta": d, "logprobs": lps, "finish_reason": reason}
        else:
            choice = {"index": index, "text": out.new_text, "logprobs": lps,
                      "finish_reason": reason}
        if self.req.return_token_ids:
            choice["token_ids"] = list(out.new_token_ids)
        return self._chunk(choice)

    async def chunks(self, cleanup: Callable) -> AsyncIterator[str]:
        """The stream. An error after the first chunk can only be told inside
        it: an OpenAI-style error body, then [DONE]. cleanup(outcome) runs
        however the stream ends."""
        outcome = "aborted"
        try:
            if self.chat:
                for i in range(self.req.n):
                    yield self._chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None})
            while True:
                try:
                    index, out = await self._next()
                except StopAsyncIteration:
                    break
                self.choices.last[index] = out
                if out.finished:
                    self.finished(out)
                    if out.finish_reason == "error":
                        raise APIError(503, ENGINE_FAILED, code="engine_error")
                text = self._delta(index, out)
                if text is not None:
                    yield text
            if self.req.include_usage:
                yield sse(dict(self._base(), choices=[],
                               usage=usage(self.prompt_tokens, self.choices.completion_tokens())))
            outcome = "ok"
            yield "data: [DONE]\n\n"
        except Exception as error:  # noqa: BLE001 (told to the client in the stream)
            outcome = "error"
            e = api_error_of(error)
            yield sse(errors.error_body(e.status, e.message, e.param, e.code, e.type))
            yield "data: [DONE]\n\n"
        finally:
            await cleanup(outcome)
