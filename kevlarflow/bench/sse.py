"""Reading an OpenAI-style stream of server-sent events (aiohttp)."""
from __future__ import annotations

import json
from typing import AsyncIterator


async def chunks(response) -> AsyncIterator[dict]:
    """The JSON chunks of the stream, in order, until `data: [DONE]`."""
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
