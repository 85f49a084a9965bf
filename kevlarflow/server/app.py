"""The OpenAI-compatible app: build_app(engine) -> a FastAPI application
(answers.py turns a request's outputs into its answer).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health, GET /status, GET /metrics, and POST /v1/fault when fault
injection is enabled."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kevlarflow.server import errors
from kevlarflow.server.chat import chat_prompt
from kevlarflow.server.errors import APIError
from kevlarflow.server.answers import Answer
from kevlarflow.server.generation import TokenText, api_error_of, merged, new_id, now
from kevlarflow.server.guard import Guard
from kevlarflow.server.metrics import ServerMetrics
from kevlarflow.server.protocol import (ChatCompletionRequest, CompletionRequest, FaultRequest)
from kevlarflow.server.state import health, is_deployment, status

log = logging.getLogger("kevlarflow.server")

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is there


class EventStream(StreamingResponse):
    """A stream whose generator is always closed, whatever ended the response
    (a client that left included): closing it aborts the engine requests."""

    def __init__(self, content, cleanup, **kwargs):
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.cleanup()  # also when the stream never started


def _parse(model_cls, body: bytes):
    if not body.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    return model_cls.model_validate_json(body)


def build_app(engine, model_name: str, *, api_key: str | None = None,
              enable_fault_injection: bool = False, max_body_bytes: int = MAX_BODY_BYTES,
              shutdown_engine: bool = True) -> FastAPI:
    """engine: an AsyncEngine. shutdown_engine: stop it (and reap a
    deployment's workers) when the app shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            if shutdown_engine:
                log.info("shutting the engine down")
                await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="KevlarFlow", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    metrics = ServerMetrics(engine)
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, model_name
    frontend = engine.engine
    token_text = TokenText(frontend.tokenizer)

    def count(path: str, outcome: str) -> None:
        metrics.requests.labels(path if path.startswith("/v1/") else "other", outcome).inc()

    def on_error(request: Request, status_code: int) -> None:
        count(request.url.path, "invalid" if status_code < 500 else "error")

    errors.install(app, on_error)

    @app.exception_handler(pydantic.ValidationError)
    async def _invalid_body(request: Request, exc: pydantic.ValidationError):
        from fastapi.exceptions import RequestValidationError
        return await app.exception_handlers[RequestValidationError](
            request, RequestValidationError(exc.errors(include_url=False)))

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes,
                       on_reject=count)

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{model_name!r}", param="model", code="model_not_found")

    async def generate(request: Request, path: str, req, prompt, logprobs: int | None,
                       default_max: int | None, chat: bool):
        check_model(req.model)
        req.check_best_of()
        prompt_ids = frontend.prepare_prompt(prompt)  # ValueError (too long...) -> 400
        room = frontend.max_seq_len - len(prompt_ids)
        max_tokens = default_max if default_max is not None else max(1, room)
        params = [req.sampling_params(i, max_tokens, logprobs) for i in range(req.n)]
        request_id = new_id("chatcmpl" if chat else "cmpl")
        created = now()
        outputs = merged(engine, prompt_ids, params, request_id)
        metrics.in_progress.inc()
        try:
            first = await outputs.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as error:
            metrics.in_progress.dec()
            await outputs.aclose()
            if isinstance(error, Exception):
                raise api_error_of(error) from error
            raise
        metrics.prompt_tokens.inc(len(prompt_ids))
        answer = Answer(req=req, chat=chat, request_id=request_id, created=created,
                        model_name=model_name, prompt_tokens=len(prompt_ids), first=first,
                        outputs=outputs, token_text=token_text, finished=metrics.finished,
                        count=lambda outcome: count(path, outcome))
        if req.stream:
            cleaned = []

            async def cleanup(outcome: str = "aborted") -> None:
                if not cleaned:
                    cleaned.append(outcome)
                    count(path, outcome)
                    metrics.in_progress.dec()
                    await outputs.aclose()

            return EventStream(answer.chunks(cleanup), cleanup)
        try:
            return await until_disconnected(request, path, answer.body())
        finally:
            metrics.in_progress.dec()
            await outputs.aclose()

    async def until_disconnected(request: Request, path: str, work):
        """Run work (a non-streaming answer); if the client leaves first, cancel
        it: the caller then closes the outputs, which aborts the engine requests
        and frees their KV."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                count(path, "aborted")
                return Response(status_code=499)  # nobody reads it

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await request.body())
        return await generate(request, "/v1/completions", req, req.single_prompt(), req.logprobs,
                              16 if req.max_tokens is None else req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(ChatCompletionRequest, await request.body())
        logprobs = req.engine_logprobs()
        prompt = chat_prompt(frontend.tokenizer, req.messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        return await generate(request, "/v1/chat/completions", req, prompt, logprobs, max_tokens,
                              chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "kevlarflow",
                                            "max_model_len": frontend.max_model_len}]}

    @app.get("/health")
    async def health_route():
        ok, body = health(engine)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/status")
    async def status_route():
        return status(engine, model_name)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if enable_fault_injection:
        @app.post("/v1/fault")
        async def fault(request: Request):
            req = _parse(FaultRequest, await request.body())
            if not is_deployment(frontend):
                raise APIError(400, "fault injection needs a deployment (--instances or --pp "
                                    "above 1)")
            frontend.inject_fault(req.instance, req.stage, req.kind)  # ValueError -> 400
            return {"injected": {"instance": req.instance, "stage": req.stage, "kind": req.kind}}

    return app
