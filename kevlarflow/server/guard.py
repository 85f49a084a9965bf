"""ASGI middleware in front of every route: Bearer authentication (all routes
but /health) and a bound on the request body (413 past it; the body is read
here, at most max_body_bytes of it, and handed on)."""
from __future__ import annotations

import hmac
import json

from kevlarflow.server.errors import error_body

OPEN_PATHS = ("/health",)


async def _send_error(send, status: int, message: str, code: str | None = None,
                      extra_headers=()) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, on_reject=None):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject  # (path, outcome): for metrics

    def _reject(self, scope, outcome: str) -> None:
        if self.on_reject is not None:
            self.on_reject(scope["path"], outcome)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            expected = f"Bearer {self.api_key}".encode()
            if not hmac.compare_digest(given, expected):
                self._reject(scope, "unauthorized")
                return await _send_error(send, 401, "missing or invalid API key (send "
                                         "'Authorization: Bearer KEY')", code="invalid_api_key",
                                         extra_headers=[(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                self._reject(scope, "invalid")
                return await _send_error(send, 400, "invalid Content-Length header")
            if too_big:
                self._reject(scope, "too_large")
                return await _send_error(send, 413, f"request body over {self.max_body_bytes} bytes")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here (chunked bodies have no Content-Length) and replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                self._reject(scope, "too_large")
                return await _send_error(send, 413, f"request body over {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
