"""asyncio front of the engine for servers and benchmarks.

The engine itself runs on one background thread (it is not thread-safe, and a
forward pass must not block the event loop); callers talk to it through a
command queue and get their outputs on per-request asyncio queues. The thread
sleeps on a condition variable when idle: no busy waiting."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections import deque
from typing import AsyncIterator

from kevlarflow.engine.llm_engine import EngineConfig, LLMEngine
from kevlarflow.engine.outputs import RequestOutput
from kevlarflow.engine.params import SamplingParams
from kevlarflow.deploy.router import NoInstanceServing

log = logging.getLogger("kevlarflow.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step raised)."""


class AsyncEngine:
    def __init__(self, model, config: EngineConfig | None = None):
        """model: a checkpoint folder, or an engine (LLMEngine or
        Controller). A DeploymentConfig makes a Controller."""
        if isinstance(model, (str, os.PathLike)):
            from kevlarflow.deploy.controller import DeploymentConfig, Controller

            if isinstance(config, DeploymentConfig):
                model = Controller(str(model), config)
            else:
                model = LLMEngine(str(model), config)
        self.engine = model
        self._commands: deque = deque()
        self._wake = threading.Condition()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._stopping = False
        self._stop_reason = "the engine was shut down"
        self._thread = threading.Thread(target=self._loop, name="kevlarflow-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields one RequestOutput per step that produced text or tokens for
        this request (new_text / new_token_ids are the delta); the last has
        finished=True. Closing or cancelling the iterator aborts the request."""
        params = params or SamplingParams()
        token_ids = self.engine.prepare_prompt(prompt)  # bad prompts fail here, in the caller
        if self._error is not None or self._stopping:
            raise EngineDeadError("the engine is not running") from self._error
        request_id = f"async-{next(self._ids)}" if request_id is None else str(request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[request_id] = (asyncio.get_running_loop(), queue)
        self._submit(("add", prompt, params, request_id, token_ids))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._listeners.pop(request_id, None)
            if not finished:
                self._submit(("abort", request_id))

    @property
    def alive(self) -> bool:
        """The engine loop runs: not shut down, and no step has raised."""
        return self._thread.is_alive() and self._error is None and not self._stopping

    def stop(self, reason: str = "the engine was shut down") -> None:
        """Stop stepping, after the step under way: every open request ends
        with EngineDeadError(reason). Returns at once; shutdown() also waits
        for the loop and stops a deployment's workers."""
        with self._wake:
            if not self._stopping:
                self._stopping, self._stop_reason = True, reason
            self._wake.notify()

    def shutdown(self) -> None:
        self.stop()
        self._thread.join(timeout=30)
        stop_workers = getattr(self.engine, "shutdown", None)
        if stop_workers:
            stop_workers()

    # Engine thread ------------------------------------------------------------

    def _submit(self, command) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def _deliver(self, request_id: str, item) -> None:
        listener = self._listeners.get(request_id)
        if listener is not None:
            loop, queue = listener
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _loop(self) -> None:
        try:
            while True:
                # A deployment is stepped even when idle, at its poll interval:
                # its health checks and recoveries run in step().
                poll = getattr(self.engine, "poll_interval_s", None)
                with self._wake:
                    while not (self._commands or self._stopping or self.engine.has_unfinished()):
                        if not self._wake.wait(timeout=poll) and poll is not None:
                            break
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished() or poll is not None:
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
        except BaseException as error:  # noqa: BLE001  (reported to every caller)
            log.exception("the engine loop stopped")
            self._error = error
        finally:
            reason = self._error or EngineDeadError(self._stop_reason)
            for request_id in list(self._listeners):
                self._deliver(request_id, EngineDeadError(str(reason)))

    def _apply(self, command) -> None:
        if command[0] == "add":
            _, prompt, params, request_id, token_ids = command
            try:
                self.engine.add_request(prompt, params, request_id, prompt_token_ids=token_ids)
            except (ValueError, NoInstanceServing) as error:
                # Refused (a deployment with no instance serving): that request
                # fails, the loop goes on.
                self._deliver(request_id, error)
        elif command[0] == "abort":
            self.engine.abort(command[1])
