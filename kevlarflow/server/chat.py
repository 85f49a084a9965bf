"""Chat messages to prompt token ids.

A tokenizer with a chat template renders the conversation with it
(transformers' apply_chat_template, with the generation prompt). Without one,
the default template is one "role: content" line per message followed by
"assistant:", e.g.

    system: You are terse.
    user: Hi!
    assistant:
"""
from __future__ import annotations

from kevlarflow.server.errors import APIError
from kevlarflow.server.protocol import ChatMessage


def default_template(messages: list[ChatMessage]) -> str:
    return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str | list[int]:
    """A string (default template: tokenized like any prompt) or token ids
    (a chat template: its text already holds the special tokens it wants)."""
    if not getattr(tokenizer, "chat_template", None):
        return default_template(messages)
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as error:  # a template may refuse a conversation (raise_exception)
        raise APIError(400, f"the chat template refused these messages: {error}",
                       param="messages") from error
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise APIError(400, "the messages render to an empty prompt", param="messages")
    return ids
