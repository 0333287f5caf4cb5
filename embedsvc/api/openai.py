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

from embedsvc.api.inputs import parse_inputs
from embedsvc.api.service import Service
from embedsvc.api.tei import INPUTS_SCHEMA
from embedsvc.api.timing import timing_headers
from embedsvc.engine import EmbedRequest
from embedsvc.engine.postprocess import to_base64
from embedsvc.errors import ValidationError


class OpenAIEmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Any = Field(json_schema_extra=INPUTS_SCHEMA)
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, gt=0)
    user: StrictStr | None = None
    input_type: Literal["query", "passage", "document"] | None = None
    prompt_name: StrictStr | None = None
    truncate: StrictBool | None = None


def openai_router() -> APIRouter:
    router = APIRouter(tags=["OpenAI"])
    started = int(time.time())

    async def embeddings(body: OpenAIEmbeddingsBody, request: Request) -> Response:
        service: Service = request.app.state.service
        engine = service.engine_set().get(body.model)
        texts, ids = parse_inputs(body.input, "input")
        prompt_name = body.prompt_name
        if body.input_type is not None:
            if prompt_name is not None:
                raise ValidationError(
                    "give either input_type or prompt_name, not both", param="input_type"
                )
            prompt_name = engine.spec.prompt_for_input_type(body.input_type)
            if ids is not None:
                prompt_name = None  # token ids are taken verbatim
        req = EmbedRequest(
            texts=texts,
            token_ids=ids,
            prompt_name=prompt_name,
            normalize=True,
            truncate=body.truncate,
            dimensions=body.dimensions,
            input_param="input",
            request_id=getattr(request.state, "request_id", ""),
        )
        result = await service.embed(request, engine, req)
        service.metrics.requests.labels(engine.name, "/v1/embeddings").inc()
        if body.encoding_format == "base64":
            data: list[dict[str, Any]] = [
                {"object": "embedding", "index": i, "embedding": to_base64(row)}
                for i, row in enumerate(result.vectors)
            ]
        else:
            data = [
                {"object": "embedding", "index": i, "embedding": row}
                for i, row in enumerate(result.vectors)
            ]
        payload = {
            "object": "list",
            "data": data,
            "model": body.model or engine.name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
        return Response(
            orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
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
            {"id": e.name, "object": "model", "created": started, "owned_by": "embedsvc"}
            for e in service.engine_set()
        ]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    return router
