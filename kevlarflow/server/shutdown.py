"""SIGTERM and Ctrl-C: open requests get a grace, then end as requests.

uvicorn's graceful shutdown waits for open responses and, at its timeout,
cancels whatever is left: a traceback in the log for each, and streams cut
off with no end for their clients. Here the engine stops at the end of the
grace instead, so that every request still open ends the way a failed one
does (its stream an error event then [DONE], a non-streaming one a 503);
uvicorn's own timeout stays behind it as a backstop."""
from __future__ import annotations

import threading

import uvicorn

BACKSTOP_S = 5.0  # past the grace, for the stopped engine's answers to go out


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine, grace_s: float):
        """config: its timeout_graceful_shutdown is set here. engine: an
        AsyncEngine, stopped grace_s after the first signal."""
        config.timeout_graceful_shutdown = grace_s + BACKSTOP_S
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._timer is None:
            reason = f"the server is shutting down (open requests were given {self.grace_s:g} s)"
            self._timer = threading.Timer(self.grace_s, self.engine.stop, args=(reason,))
            self._timer.daemon = True
            self._timer.start()
        super().handle_exit(sig, frame)

    def run(self, sockets=None) -> None:
        try:
            super().run(sockets)
        finally:
            if self._timer is not None:
                self._timer.cancel()
