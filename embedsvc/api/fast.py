"""The lean path for the embedding routes (/embed, /, /v1/embeddings, /embeddings).

A body in the common shape (text inputs, fields of the right types) is decoded with
orjson, checked by hand, embedded and answered here, without FastAPI's routing, pydantic
or a Request object. Anything else (token-id input, a field of the wrong type, a body
that is not JSON) goes on to the FastAPI routes, whose full validators word the errors:
the public behaviour is the routes', this only takes a shorter way to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Send

from embedsvc.api.encode import openai_embeddings_body, tei_embed_body, timing_lines
from embedsvc.api.errors import embedsvc_error_response, internal_error_response
from embedsvc.api.openai import INPUT_TYPES, openai_prompt
from embedsvc.api.service import Service
from embedsvc.api.tei import TRUNCATION_DIRECTIONS
from embedsvc.engine import EmbedRequest, EmbedResult, ModelEngine
from embedsvc.errors import ClientDisconnected, EmbedsvcError, ErrorKind
from embedsvc.http.answer import Answer, header_lines, header_pairs
from embedsvc.logs import request_id_var

log = logging.getLogger(__name__)

TEI_PATHS = frozenset({"/embed", "/"})
OPENAI_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
FAST_PATHS = TEI_PATHS | OPENAI_PATHS

_JSON = b"content-type: application/json\r\n"


@dataclass(slots=True)
class Fields:
    """What a body in the common shape asks for."""

    texts: list[str]
    model: str | None
    prompt_name: str | None
    truncate: bool | None
    dimensions: int | None
    normalize: bool = True
    direction: str = "right"
    format: str = "float"
    input_type: str | None = None


def _shared(d: dict[str, Any], texts_key: str) -> Fields | None:
    """The fields both dialects share: texts (a string or a non-empty list of strings),
    then truncate, prompt_name, dimensions (> 0) and model, each null or of exactly its
    type; None for anything else."""
    texts = d.get(texts_key)
    if type(texts) is str:
        texts = [texts]
    elif type(texts) is not list or not texts or not all(type(v) is str for v in texts):
        return None
    get = d.get
    truncate, prompt, dims = get("truncate"), get("prompt_name"), get("dimensions")
    model = get("model")
    if (
        (truncate is not None and type(truncate) is not bool)
        or (prompt is not None and type(prompt) is not str)
        or (dims is not None and (type(dims) is not int or dims <= 0))
        or (model is not None and type(model) is not str)
    ):
        return None
    return Fields(texts, model, prompt, truncate, dims)


def parse_tei(d: dict[str, Any]) -> Fields | None:
    fields = _shared(d, "inputs")
    if fields is None or len(d) == 1 or (len(d) == 2 and "truncate" in d):
        return fields  # the usual bodies: nothing more to look at
    normalize = d.get("normalize", True)
    direction = d.get("truncation_direction", "Right")
    if type(normalize) is not bool or direction not in TRUNCATION_DIRECTIONS:
        return None
    if d.get("encoding_format", "float") != "float":
        return None  # integer output: the route
    fields.normalize = normalize
    fields.direction = direction.lower()
    return fields


def parse_openai(d: dict[str, Any]) -> Fields | None:
    fields = _shared(d, "input")
    if fields is None:
        return None
    fmt = d.get("encoding_format", "float")
    input_type = d.get("input_type")
    user = d.get("user")
    if (
        fmt not in ("float", "base64")
        or (input_type is not None and input_type not in INPUT_TYPES)
        or (user is not None and type(user) is not str)
    ):
        return None
    fields.format = fmt
    fields.input_type = input_type
    return fields


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
        engine = self.service.engine_set().get(fields.model)
        if openai:
            prompt = openai_prompt(engine, fields.prompt_name, fields.input_type, False)
            param = "input"
        else:
            prompt, param = fields.prompt_name, "inputs"
        req = EmbedRequest(
            texts=fields.texts,
            prompt_name=prompt,
            normalize=fields.normalize,
            truncate=fields.truncate,
            truncation_direction=fields.direction,
            dimensions=fields.dimensions,
            input_param=param,
            request_id=rid,
            timeout=timeout,
        )
        return Call(path, openai, engine, req, fields.model, fields.format)

    def answer(self, call: Call, result: EmbedResult) -> Answer:
        """The 200 for a finished call."""
        engine = call.engine
        if call.openai:
            out = openai_embeddings_body(result, call.format, call.model or engine.name)
            engine.metrics.requests["/v1/embeddings"].inc()
        else:
            out = tei_embed_body(result)
            engine.metrics.requests["/embed"].inc()
        return 200, _JSON + b"content-length: %d\r\n" % len(out) + timing_lines(result), out

    def failure(self, path: str, exc: BaseException, rid: str) -> Answer:
        """The error answer for `exc` (a typed error, or a fault: 500, logged), counted."""
        if isinstance(exc, EmbedsvcError):
            self.metrics.failures.labels(path, exc.kind.value).inc()
            resp = embedsvc_error_response(path, exc, rid)
        elif isinstance(exc, ClientDisconnected):
            self.metrics.failures.labels(path, "client_disconnected").inc()
            return 499, b"content-length: 0\r\n", b""  # nobody reads it
        else:
            self.metrics.failures.labels(path, ErrorKind.BACKEND.value).inc()
            resp = internal_error_response(path, exc, rid)
        return resp.status_code, header_lines(resp.raw_headers), bytes(resp.body)

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
        status, lines, out = answer
        headers = header_pairs(lines)
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
        except Exception as e:
            respond(self.failure(path, e, rid))
            return True
        if call is None:
            return False

        def done(result: EmbedResult | None, error: BaseException | None) -> None:
            try:
                if result is None:
                    raise error or RuntimeError("no result")
                answer = self.answer(call, result)
            except BaseException as e:  # the answer to any failure, a fault too (500)
                token = request_id_var.set(rid)  # for the log record of a fault
                try:
                    answer = self.failure(path, e, rid)
                finally:
                    request_id_var.reset(token)
            respond(answer)

        try:
            call.engine.submit(call.req, disconnected, done)
        except Exception as e:
            respond(self.failure(path, e, rid))
        return True
