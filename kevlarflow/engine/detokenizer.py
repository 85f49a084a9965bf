"""Token ids to streamed text, and stop conditions on that text.

The engine pipes each step's new tokens through both, per request:

    delta = detokenizer.add_tokens(new_ids)
    check = stop_checker.add_text(delta)       # check.text goes to the client
    ...
    # when the request ends for another reason ("length", eos, stop token):
    tail = stop_checker.add_text(detokenizer.flush()).text + stop_checker.flush()

Neither ever streams text that the final output does not have: the
detokenizer holds back bytes that may still become a character, the stop
checker holds back text that may still become a stop string.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character is at most 4 bytes, so one still incomplete after this many
# tokens is invalid output, not a character in the making.
MAX_HELD_TOKENS = 8
# Context kept while the newest tokens give no text (skipped special tokens).
MAX_CONTEXT_TOKENS = 16


def decoder_for(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text for a transformers tokenizer or a bare tokenizers.Tokenizer."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # transformers
        # Cleaning up spaces (" ." -> ".") can rewrite text across a token
        # boundary after it was streamed, so it is off (transformers 5's default).
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                            clean_up_tokenization_spaces=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Decodes a growing list of generated ids into text deltas, decoding only a
    short window of recent tokens per call.

    The window is ids[_prefix:]. Its first part, ids[_prefix:_read], is context
    whose text was all streamed already; it is decoded along with the new tokens
    because some decoders depend on the neighbours (a leading space is dropped
    only at the start of a decode, byte tokens join into characters), and the
    delta is what the new tokens add to it. The concatenated deltas, after
    flush(), equal tokenizer.decode(all_ids, skip_special_tokens=...).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._decode = decoder_for(tokenizer, skip_special_tokens)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        # Characters past the context already streamed (the window's text up to a
        # held-back incomplete character).
        self._emitted_past_read = 0

    def add_tokens(self, new_ids: Iterable[int]) -> str:
        self._ids.extend(int(i) for i in new_ids)
        context_length, text = self._window()
        done = context_length + self._emitted_past_read
        if not text.endswith(REPLACEMENT_CHAR):
            self._advance(len(self._ids), 0, len(text) > context_length)
            return text[done:]
        # The trailing U+FFFD may be a character whose bytes have not all come yet.
        delta = text[done:len(text.rstrip(REPLACEMENT_CHAR))]
        self._emitted_past_read += len(delta)
        if len(self._ids) - self._read > MAX_HELD_TOKENS:
            delta += self._release_held(text, context_length, done + len(delta))
        return delta

    def flush(self) -> str:
        """The held-back tail, when no more tokens will come."""
        context_length, text = self._window()
        done = context_length + self._emitted_past_read
        self._advance(len(self._ids), 0, len(text) > context_length)
        return text[done:]

    def _window(self) -> tuple[int, str]:
        """(length of the context's text, the window's text)."""
        context = self._decode(self._ids[self._prefix:self._read]) if self._read > self._prefix else ""
        return len(context), self._decode(self._ids[self._prefix:])

    def _advance(self, read: int, emitted_past_read: int, read_tokens_have_text: bool) -> None:
        """Mark ids[:read] as read; what was read last becomes the context. The
        old context stays while the tokens read since give no text of their own
        (skipped special tokens): without it, the next word could lose its
        leading space."""
        if read_tokens_have_text or read - self._prefix > MAX_CONTEXT_TOKENS:
            self._prefix = self._read
        self._read = read
        self._emitted_past_read = emitted_past_read

    def _release_held(self, text: str, context_length: int, done: int) -> str:
        """Too many tokens held: move the window on at the latest token boundary
        where the text splits cleanly, streaming what lies before it."""
        for split in range(len(self._ids) - 1, self._read, -1):
            head = self._decode(self._ids[self._prefix:split])
            if self._splits_cleanly(head, split, text):
                self._advance(split, max(done, len(head)) - len(head), len(head) > context_length)
                return text[done:len(head)]
        # Nothing but invalid bytes: stream their replacement characters.
        self._advance(len(self._ids), 0, True)
        return text[done:]

    def _splits_cleanly(self, head: str, split: int, text: str) -> bool:
        """Whether no character spans the boundary, now or after more tokens."""
        if not text.startswith(head):
            return False
        if not head.endswith(REPLACEMENT_CHAR):
            return True  # ends on a complete character
        # Invalid bytes before the boundary: clean if the bytes after it decode
        # on their own to the same text (a joined sequence would decode shorter).
        tail = self._decode(self._ids[split:])
        return tail != "" and head + tail == text


class StopCheck(NamedTuple):
    text: str       # to stream now
    stopped: bool   # a stop string was found; the request is done


class StopChecker:
    """Finds the first stop string in the streamed text, even when it spans
    deltas, and holds back any tail that could still begin one."""

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self._stops = list(stop)
        self._include_stop = include_stop_str_in_output
        # Text received but not streamed: the longest tail that begins a stop
        # string. Streamed text never holds the start of an unfinished stop
        # string, so only this and the next delta need searching.
        self._held = ""
        self.stopped = False

    @classmethod
    def from_params(cls, params) -> "StopChecker":
        return cls(params.stop, params.include_stop_str_in_output)

    def add_text(self, delta: str) -> StopCheck:
        if self.stopped or not delta:
            return StopCheck("", self.stopped)
        text = self._held + delta
        found = self._first_stop(text)
        if found is not None:
            start, end = found
            self._held = ""
            self.stopped = True
            return StopCheck(text[:end if self._include_stop else start], True)
        release = len(text) - self._partial_stop_length(text)
        self._held = text[release:]
        return StopCheck(text[:release], False)

    def flush(self) -> str:
        """Release the held-back tail: the request ended for another reason."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the stop string that completes first (the longest on
        a tie): the same answer however the text was cut into deltas."""
        best = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop))
                if best is None or key < best[0]:
                    best = (key, (start, start + len(stop)))
        return None if best is None else best[1]

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of the text that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def should_stop_on_token(token_id: int, params, eos_token_id: int | Iterable[int] | None) -> str | None:
    """"stop" when token_id is one of params.stop_token_ids, or an eos id and
    params.ignore_eos is off; None otherwise ("length" is the engine's call).
    eos_token_id may be a collection: some models end on several ids."""
    if token_id in params.stop_token_ids:
        return "stop"
    if params.ignore_eos or eos_token_id is None:
        return None
    eos_ids = (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id
    return "stop" if token_id in eos_ids else None
