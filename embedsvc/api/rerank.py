"""Reranking with cross-encoders (models with `task: rerank`).

- TEI `POST /rerank`: `{query, texts, raw_scores, return_text, truncate,
  truncation_direction, model}` -> `[{index, score, text?}]`, best first.
- `POST /v1/rerank` (Cohere and Jina shape, what LangChain, LlamaIndex and Haystack reranker
  clients send): `{model, query, documents (strings or {text}), top_n, return_documents}`
  -> `{id, model, results: [{index, relevance_score, document?}], usage, meta}`.

The pairs go through the engine like any other inputs (admission, batching under the token
budget, a large request queued a chunk at a time). Scores are the model's logit through its
activation (sigmoid for one label, as `CrossEncoder.predict`); TEI's `raw_scores` returns the
logit itself.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.responses import Response

from embedsvc.api.encode import timing_headers
from embedsvc.api.service import Service
from embedsvc.engine import EmbedRequest, EmbedResult, ModelEngine
from embedsvc.errors import EmptyInputError


class TEIRerankBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None
    truncation_direction: Literal["Right", "right"] = "Right"
    model: StrictStr | None = None


class DocumentText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: StrictStr


class RerankBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    documents: list[StrictStr | DocumentText]
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(default=None, gt=0)
    return_documents: StrictBool = False
    truncate: StrictBool = True  # Cohere and Jina cut long documents


def scores(engine: ModelEngine, result: EmbedResult, raw: bool) -> np.ndarray:
    logits = result.vectors[:, 0].astype(np.float64)
    if raw or engine.info.score_activation == "identity":
        return logits
    return 1.0 / (1.0 + np.exp(-logits))


async def score_pairs(
    request: Request,
    model: str | None,
    query: str,
    docs: list[str],
    truncate: bool | None,
    param: str,
) -> tuple[ModelEngine, EmbedResult]:
    service: Service = request.app.state.service
    engine = service.engine_set().get(model, task="rerank")
    if not docs:
        raise EmptyInputError(f"{param} is empty", param=param)
    if not query:
        raise EmptyInputError("query is an empty string", param="query")
    req = EmbedRequest(
        pairs=[(query, d) for d in docs],
        task="rerank",
        prompt_name=None,
        normalize=False,
        truncate=truncate,
        input_param=param,
        request_id=getattr(request.state, "request_id", ""),
        timeout=getattr(request.state, "request_timeout", None),
    )
    result = await service.embed(request, engine, req)
    engine.metrics.requests["/rerank"].inc()
    return engine, result


def rerank_router() -> APIRouter:
    router = APIRouter(tags=["Rerank"])

    @router.post("/rerank", summary="Rerank texts against a query (TEI)")
    async def tei_rerank(body: TEIRerankBody, request: Request) -> Response:
        engine, result = await score_pairs(
            request, body.model, body.query, body.texts, body.truncate, "texts"
        )
        s = scores(engine, result, body.raw_scores)
        order = np.argsort(-s, kind="stable")
        out: list[dict[str, Any]] = []
        for i in order:
            item: dict[str, Any] = {"index": int(i), "score": float(s[i])}
            if body.return_text:
                item["text"] = body.texts[i]
            out.append(item)
        return Response(
            orjson.dumps(out),
            media_type="application/json",
            headers=timing_headers(result),
        )

    @router.post("/v1/rerank", summary="Rerank documents against a query (Cohere / Jina)")
    async def rerank(body: RerankBody, request: Request) -> Response:
        docs = [d if isinstance(d, str) else d.text for d in body.documents]
        engine, result = await score_pairs(
            request, body.model, body.query, docs, body.truncate, "documents"
        )
        s = scores(engine, result, raw=False)
        order = np.argsort(-s, kind="stable")[: body.top_n]
        results: list[dict[str, Any]] = []
        for i in order:
            item: dict[str, Any] = {"index": int(i), "relevance_score": float(s[i])}
            if body.return_documents:
                item["document"] = {"text": docs[i]}
            results.append(item)
        payload = {
            "id": getattr(request.state, "request_id", ""),
            "model": body.model or engine.name,
            "results": results,
            "usage": {"total_tokens": result.prompt_tokens},
            "meta": {"billed_units": {"search_units": 1}},
        }
        return Response(
            orjson.dumps(payload),
            media_type="application/json",
            headers=timing_headers(result),
        )

    return router
