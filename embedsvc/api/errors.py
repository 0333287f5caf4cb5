"""Render errors in the dialect of the route that was called.

TEI routes:    {"error": "...", "error_type": "Validation|Empty|..."}
OpenAI routes: {"error": {"message", "type", "param", "code"}} (and vLLM's /classify)
Cohere routes: {"message": "..."} (/v2/embed; Cohere's API answers errors so)
FastAPI's own request-parsing errors and unknown routes get the same shapes. A 500 never
carries exception text; it carries the request id, and the details go to the log.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from embedsvc.errors import STATUS_TABLE, EmbedsvcError, ErrorKind

log = logging.getLogger(__name__)

OPENAI_PREFIXES = ("/v1/", "/embeddings", "/classify")  # /classify: vLLM's OpenAI server
COHERE_PREFIXES = ("/v2/",)
Dialect = Literal["tei", "openai", "cohere"]


def dialect_of(path: str) -> Dialect:
    """Whose error shape a route answers in."""
    if path.startswith(OPENAI_PREFIXES):
        return "openai"
    return "cohere" if path.startswith(COHERE_PREFIXES) else "tei"


def error_response(
    path: str,
    kind: ErrorKind,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    status, body = error_body(dialect_of(path), kind, message, param)
    return Response(
        dump_json(body), status_code=status, media_type="application/json", headers=headers
    )


def error_body(
    dialect: Dialect, kind: ErrorKind, message: str, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Status and body of an error in `dialect`."""
    r = STATUS_TABLE[kind]
    if dialect == "openai":
        error = {"message": message, "type": r.openai_type, "param": param, "code": r.openai_code}
        return r.openai_status, {"error": error}
    if dialect == "cohere":
        return r.openai_status, {"message": message}
    return r.tei_status, {"error": message, "error_type": r.tei_type}


def dump_json(body: Any) -> bytes:
    """orjson, except for text that is not valid UTF-8 (a lone surrogate a client sent,
    echoed in a message): the standard library escapes it instead of failing."""
    try:
        return orjson.dumps(body)
    except TypeError:
        import json

        return json.dumps(body).encode()


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


def embedsvc_error_response(path: str, exc: EmbedsvcError, rid: str) -> Response:
    """The response for a typed error, in the dialect of `path`."""
    message = exc.message
    if exc.kind is ErrorKind.BACKEND:
        message = f"{message} (request id {rid})"
    headers = None
    if exc.kind is ErrorKind.OVERLOADED or exc.retry_after:
        headers = {"retry-after": str(exc.retry_after or 1)}
    return error_response(path, exc.kind, message, exc.param, headers)


def internal_error_response(path: str, exc: BaseException, rid: str) -> Response:
    """A 500/424 that names the request id; the exception goes to the log only."""
    log.error("request %s on %s failed", rid, path, exc_info=exc)
    return error_response(
        path, ErrorKind.BACKEND, f"internal error while handling the request (request id {rid})"
    )


def install_error_handlers(app: FastAPI, on_failure: Any) -> None:
    """`on_failure(route, kind)` is called for every error answered (for metrics)."""

    async def embedsvc_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmbedsvcError)
        on_failure(request.url.path, exc.kind)
        return embedsvc_error_response(request.url.path, exc, request_id(request))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        on_failure(request.url.path, ErrorKind.VALIDATION)
        message, param = describe_validation_errors(exc.errors())
        return error_response(request.url.path, ErrorKind.VALIDATION, message, param)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        if exc.status_code == 404:
            message = f"no route {request.method} {path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {path}"
        else:
            message = str(exc.detail)
        body: dict[str, Any]
        dialect = dialect_of(path)
        if dialect == "openai":
            body = {
                "error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": None}
            }  # fmt: skip
        elif dialect == "cohere":
            body = {"message": message}
        else:
            body = {"error": message, "error_type": "Validation"}
        return Response(
            dump_json(body),
            status_code=exc.status_code,
            media_type="application/json",
            headers=getattr(exc, "headers", None),
        )

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        on_failure(request.url.path, ErrorKind.BACKEND)
        return internal_error_response(request.url.path, exc, request_id(request))

    app.add_exception_handler(EmbedsvcError, embedsvc_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


def describe_validation_errors(errors: Any) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list; the field path as param."""
    parts = []
    param = None
    for err in list(errors)[:3]:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"request body is not valid JSON ({ctx.get('error', 'parse error')})")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) if loc else "body"
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "missing":
            parts.append(f"{field} is required")
            continue
        if "input" in err and err.get("type") != "missing":
            shown = _short(err["input"])
            parts.append(f"{field}: {msg} (got {shown})")
        else:
            parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request", param


def _short(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
