"""OpenAI-style error bodies, and the exception handlers that turn every
client mistake into a 4xx (never a 500):

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("kevlarflow.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else
                                      "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": message,
                      "type": type or TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, type), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg', '')}", None
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


def install(app: FastAPI, on_client_error=None) -> None:
    """on_client_error(request, status): called for every error answer (metrics)."""

    def note(request: Request, status: int) -> None:
        if on_client_error is not None:
            on_client_error(request, status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        note(request, exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        note(request, 400)
        return error_response(400, message, param)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):
        # SamplingParams and prompt checks raise ValueError with a message for the client.
        note(request, 400)
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        note(request, exc.status_code)
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, exc: json.JSONDecodeError):
        note(request, 400)
        return error_response(400, f"the body is not valid JSON: {exc}")
