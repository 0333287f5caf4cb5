"""OpenAI dialect: POST /v1/embeddings (and /embeddings), GET /v1/models.

Extensions beyond OpenAI's schema: `input_type` (query|passage|document, as Cohere,
Voyage and NIM name it) picks the model's query or passage prompt; `prompt_name` picks a
prompt by name; `truncate` overrides the server's auto-truncate setting.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.responses import Response

from embedsvc.api.encode import openai_embeddings_body, timing_headers
from embedsvc.api.inputs import INPUTS_SCHEMA, parse_inputs
from embedsvc.api.service import Service
from embedsvc.engine import NO_PROMPT, EmbedRequest, ModelEngine
from embedsvc.errors import ValidationError

INPUT_TYPES = ("query", "passage", "document")


class OpenAIEmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Any = Field(json_schema_extra=INPUTS_SCHEMA)
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64", "int8", "uint8", "binary", "ubinary"] = "float"
    dimensions: StrictInt | None = Field(default=None, gt=0)
    user: StrictStr | None = None
    input_type: Literal["query", "passage", "document"] | None = None
    prompt_name: StrictStr | None = None
    truncate: StrictBool | None = None


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
    texts, ids = parse_inputs(body.input, "input")
    if ids is not None and service.cl100k is not None:
        # OpenAI's ids: embedded exactly as the text they encode (prompt included).
        texts, ids = service.cl100k.decode(ids, "input"), None
    prompt_name = openai_prompt(engine, body.prompt_name, body.input_type, ids is not None)
    req = EmbedRequest(
        texts=texts,
        token_ids=ids,
        prompt_name=prompt_name,
        normalize=True,
        truncate=body.truncate,
        dimensions=body.dimensions,
        input_param="input",
        request_id=request_id,
        timeout=timeout,
    )
    return engine, req


def openai_router() -> APIRouter:
    router = APIRouter(tags=["OpenAI"])
    started = int(time.time())

    async def embeddings(body: OpenAIEmbeddingsBody, request: Request) -> Response:
        service: Service = request.app.state.service
        engine, req = openai_request(
            service,
            body,
            request_id=getattr(request.state, "request_id", ""),
            timeout=getattr(request.state, "request_timeout", None),
        )
        result = await service.embed(request, engine, req)
        engine.metrics.requests["/v1/embeddings"].inc()
        name = body.model or engine.name
        return Response(
            openai_embeddings_body(result, body.encoding_format, name, engine.info.calibration),
            media_type="application/json",
            headers=timing_headers(result),
        )

    for path in ("/v1/embeddings", "/embeddings"):
        router.add_api_route(
            path, embeddings, methods=["POST"], response_class=Response,
            summary="Create embeddings (OpenAI)", name=f"embeddings{path.replace('/', '_')}",
        )  # fmt: skip

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
