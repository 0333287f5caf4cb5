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
from typing import Any

import orjson
from starlette.types import Send

from embedsvc.api.encode import openai_embeddings_body, tei_embed_body, timing_headers
from embedsvc.api.errors import embedsvc_error_response, internal_error_response
from embedsvc.api.openai import INPUT_TYPES, openai_prompt
from embedsvc.api.service import Service
from embedsvc.api.tei import TRUNCATION_DIRECTIONS
from embedsvc.engine import EmbedRequest
from embedsvc.errors import ClientDisconnected, EmbedsvcError, ErrorKind

log = logging.getLogger(__name__)

TEI_PATHS = frozenset({"/embed", "/"})
OPENAI_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
FAST_PATHS = TEI_PATHS | OPENAI_PATHS

_JSON = (b"content-type", b"application/json")
_SCOPE: dict[str, Any] = {"type": "http"}  # what a Response needs to send itself


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


class FastEmbed:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.metrics = service.metrics

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
            d = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if type(d) is not dict:
            return False
        openai = path in OPENAI_PATHS
        fields = parse_openai(d) if openai else parse_tei(d)
        if fields is None:
            return False
        try:
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
            result = await engine.embed(req, disconnected)
        except EmbedsvcError as e:
            self.metrics.failures.labels(path, e.kind.value).inc()
            await embedsvc_error_response(path, e, rid)(_SCOPE, _no_receive, send)
            return True
        except ClientDisconnected:
            self.metrics.failures.labels(path, "client_disconnected").inc()
            await send({"type": "http.response.start", "status": 499, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return True
        except Exception as e:
            self.metrics.failures.labels(path, ErrorKind.BACKEND.value).inc()
            await internal_error_response(path, e, rid)(_SCOPE, _no_receive, send)
            return True
        if openai:
            out = openai_embeddings_body(result, fields["format"], fields["model"] or engine.name)
            engine.metrics.requests["/v1/embeddings"].inc()
        else:
            out = tei_embed_body(result)
            engine.metrics.requests["/embed"].inc()
        headers = [_JSON, (b"content-length", b"%d" % len(out)), *timing_headers(result)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})
        return True


async def _no_receive() -> dict[str, Any]:
    raise RuntimeError("a response does not read the request")
