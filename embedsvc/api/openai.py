"""OpenAI dialect: POST /v1/embeddings (and /embeddings), GET /v1/models.

The body and its extensions beyond OpenAI's schema: api/bodies.py.
"""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from embedsvc.api.bodies import OpenAIEmbeddingsBody, example_tuples
from embedsvc.api.calls import Call, Context, Route
from embedsvc.api.encode import openai_embeddings_body
from embedsvc.api.inputs import parse_inputs
from embedsvc.api.service import Service
from embedsvc.engine import (
    NO_PROMPT,
    EmbedRequest,
    EmbedResult,
    ModelEngine,
    Texts,
    TokenIds,
)
from embedsvc.errors import ValidationError


def openai_prompt(
    engine: ModelEngine, prompt_name: str | None, input_type: str | None, token_ids: bool
) -> str | None:
    """The prompt an OpenAI-dialect request asks for, by `prompt_name` or `input_type`."""
    if input_type is None:
        return prompt_name
    if prompt_name is not None:
        raise ValidationError("give either input_type or prompt_name, not both", param="input_type")
    if token_ids:
        return None  # token ids are taken verbatim
    # A model without a prompt for this input type gets none, not its default prompt.
    return engine.spec.prompt_for_input_type(input_type) or NO_PROMPT


def openai_request(
    service: Service, body: OpenAIEmbeddingsBody, request_id: str, timeout: float | None
) -> tuple[ModelEngine, EmbedRequest]:
    """The engine and the request a validated body asks for (also used by
    `embedsvc embed --format openai-batch`, so batch lines read exactly like requests)."""
    engine = service.engine_set().get(body.model)
    inputs: Texts | TokenIds = parse_inputs(body.input, "input")
    if isinstance(inputs, TokenIds) and service.cl100k is not None:
        # OpenAI's ids: embedded exactly as the text they encode (prompt included).
        inputs = Texts(service.cl100k.decode(inputs.ids, "input"))
    ids = isinstance(inputs, TokenIds)
    if body.instruction is not None and body.input_type is not None:
        raise ValidationError(
            "give either instruction or input_type, not both: the instruction takes the "
            "query prompt's place",
            param="instruction",
        )
    prompt_name = openai_prompt(engine, body.prompt_name, body.input_type, ids)
    req = EmbedRequest(
        inputs,
        prompt_name=prompt_name,
        instruction=body.instruction,
        examples=example_tuples(body.examples),
        normalize=True,
        truncate=body.truncate,
        dimensions=body.dimensions,
        input_param="input",
        request_id=request_id,
        timeout=timeout,
    )
    return engine, req


def embeddings(service: Service, body: OpenAIEmbeddingsBody, ctx: Context) -> Call:
    engine, req = openai_request(service, body, ctx.request_id, ctx.timeout)
    fmt, name, calibration = body.encoding_format, body.model or engine.name, None
    if fmt not in ("float", "base64"):
        calibration = engine.info.calibration

    def render(result: EmbedResult) -> bytes:
        return openai_embeddings_body(result, fmt, name, calibration)

    return Call(engine, req, render)


ROUTES = [
    Route(path, OpenAIEmbeddingsBody, embeddings, "Create embeddings (OpenAI)", "OpenAI",
          name=f"embeddings{path.replace('/', '_')}", metric="/v1/embeddings")
    for path in ("/v1/embeddings", "/embeddings")
]  # fmt: skip


def openai_router() -> APIRouter:
    """GET /v1/models (the embeddings routes are engine routes: ROUTES)."""
    router = APIRouter(tags=["OpenAI"])
    started = int(time.time())

    @router.get("/v1/models", summary="Loaded models (OpenAI)")
    async def models(request: Request) -> Response:
        service: Service = request.app.state.service
        data = [
            {
                "id": e.name,
                "object": "model",
                "created": started,
                "owned_by": "embedsvc",
                "task": e.spec.task,
            }
            for e in service.engine_set()
        ]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    return router
