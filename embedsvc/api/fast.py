"""The lean path for the embedding routes (/embed, /, /v1/embeddings, /embeddings).

A body in the common shape (text inputs, fields of the right types) is decoded with
orjson, checked by hand, embedded and answered here, without FastAPI's routing, pydantic
or a Request object. Anything else (token-id input, a field of the wrong type, a body
that is not JSON) goes on to the FastAPI routes, whose full validators word the errors:
the public behaviour is the routes', this only takes a shorter way to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Send

from embedsvc.api.encode import openai_embeddings_body, tei_embed_body, timing_headers
from embedsvc.api.errors import embedsvc_error_response, internal_error_response
from embedsvc.api.openai import INPUT_TYPES, openai_prompt
from embedsvc.api.service import Service
from embedsvc.api.tei import TRUNCATION_DIRECTIONS
from embedsvc.engine import EmbedRequest, EmbedResult, ModelEngine
from embedsvc.errors import ClientDisconnected, EmbedsvcError, ErrorKind
from embedsvc.http_protocol import Answer

log = logging.getLogger(__name__)

TEI_PATHS = frozenset({"/embed", "/"})
OPENAI_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
FAST_PATHS = TEI_PATHS | OPENAI_PATHS

_JSON = (b"content-type", b"application/json")


def _texts(value: Any) -> list[str] | None:
    if type(value) is str:
        return [value]
    if type(value) is list and value and all(type(v) is str for v in value):
        return value
    return None


# Optional fields both dialects share: each null or of exactly this type.
_SHARED = (("truncate", bool), ("prompt_name", str), ("dimensions", int), ("model", str))


def _shared(d: dict[str, Any], texts_key: str) -> dict[str, Any] | None:
    texts = _texts(d.get(texts_key))
    if texts is None:
        return None
    out: dict[str, Any] = {"texts": texts}
    for key, kind in _SHARED:
        v = out[key] = d.get(key)
        if v is not None and type(v) is not kind:
            return None
    if out["dimensions"] is not None and out["dimensions"] <= 0:
        return None
    return out


def parse_tei(d: dict[str, Any]) -> dict[str, Any] | None:
    fields = _shared(d, "inputs")
    normalize = d.get("normalize", True)
    direction = d.get("truncation_direction", "Right")
    if fields is None or type(normalize) is not bool or direction not in TRUNCATION_DIRECTIONS:
        return None
    if d.get("encoding_format", "float") != "float":
        return None  # integer output: the route
    return fields | {"normalize": normalize, "direction": direction.lower()}


def parse_openai(d: dict[str, Any]) -> dict[str, Any] | None:
    fields = _shared(d, "input")
    fmt = d.get("encoding_format", "float")
    input_type = d.get("input_type")
    user = d.get("user")
    if (
        fields is None
        or fmt not in ("float", "base64")
        or (input_type is not None and input_type not in INPUT_TYPES)
        or (user is not None and type(user) is not str)
    ):
        return None
    return fields | {"format": fmt, "input_type": input_type}


@dataclass(slots=True)
class Call:
    """A body the lean path took: the engine and the request for it."""

    path: str
    openai: bool
    engine: ModelEngine
    req: EmbedRequest
    model: str | None
    format: str


class FastEmbed:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.metrics = service.metrics

    def prepare(self, path: str, body: bytes, rid: str, timeout: float | None) -> Call | None:
        """The call for a body in the common shape; None to pass it on to the routes.
        Raises EmbedsvcError for a request the routes would refuse in the same words
        (an unknown model or prompt)."""
        try:
            d = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if type(d) is not dict:
            return None
        openai = path in OPENAI_PATHS
        fields = parse_openai(d) if openai else parse_tei(d)
        if fields is None:
            return None
        engine = self.service.engine_set().get(fields["model"])
        if openai:
            prompt = openai_prompt(engine, fields["prompt_name"], fields["input_type"], False)
            normalize, direction, param = True, "right", "input"
        else:
            prompt = fields["prompt_name"]
            normalize, direction, param = fields["normalize"], fields["direction"], "inputs"
        req = EmbedRequest(
            texts=fields["texts"],
            prompt_name=prompt,
            normalize=normalize,
            truncate=fields["truncate"],
            truncation_direction=direction,
            dimensions=fields["dimensions"],
            input_param=param,
            request_id=rid,
            timeout=timeout,
        )
        return Call(path, openai, engine, req, fields["model"], fields.get("format", "float"))

    def answer(self, call: Call, result: EmbedResult) -> Answer:
        """The 200 for a finished call."""
        engine = call.engine
        if call.openai:
            out = openai_embeddings_body(result, call.format, call.model or engine.name)
            engine.metrics.requests["/v1/embeddings"].inc()
        else:
            out = tei_embed_body(result)
            engine.metrics.requests["/embed"].inc()
        headers = [_JSON, (b"content-length", b"%d" % len(out)), *timing_headers(result)]
        return 200, headers, out

    def failure(self, path: str, exc: BaseException, rid: str) -> Answer:
        """The error answer for `exc` (a typed error, or a fault: 500, logged), counted."""
        if isinstance(exc, EmbedsvcError):
            self.metrics.failures.labels(path, exc.kind.value).inc()
            resp = embedsvc_error_response(path, exc, rid)
        elif isinstance(exc, ClientDisconnected):
            self.metrics.failures.labels(path, "client_disconnected").inc()
            return 499, [(b"content-length", b"0")], b""  # nobody reads it
        else:
            self.metrics.failures.labels(path, ErrorKind.BACKEND.value).inc()
            resp = internal_error_response(path, exc, rid)
        return resp.status_code, list(resp.raw_headers), bytes(resp.body)

    async def handle(
        self,
        path: str,
        body: bytes,
        send: Send,
        rid: str,
        disconnected: Callable[[], bool] | None,
        timeout: float | None = None,
    ) -> bool:
        """Answer the request if its body is in the common shape; False to pass it on."""
        try:
            call = self.prepare(path, body, rid, timeout)
            if call is None:
                return False
            answer = self.answer(call, await call.engine.embed(call.req, disconnected))
        except Exception as e:
            answer = self.failure(path, e, rid)
        status, headers, out = answer
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})
        return True

    def begin(
        self,
        path: str,
        body: bytes,
        rid: str,
        timeout: float | None,
        disconnected: Callable[[], bool],
        respond: Callable[[Answer], None],
    ) -> bool:
        """`handle` without a coroutine, for the HTTP protocol's direct route: False to
        pass the request on; else `respond(answer)` is called once, now or when the
        vectors are ready (on the event loop)."""
        try:
            call = self.prepare(path, body, rid, timeout)
            if call is None:
                return False
            future = call.engine.submit(call.req, disconnected)
        except Exception as e:
            respond(self.failure(path, e, rid))
            return True

        def done(f: asyncio.Future[EmbedResult]) -> None:
            try:
                answer = self.answer(call, f.result())
            except BaseException as e:  # even a cancelled future gets its answer (a 500)
                answer = self.failure(path, e, rid)
            respond(answer)

        future.add_done_callback(done)
        return True
