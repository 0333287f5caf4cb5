"""Reranking with cross-encoders and LLM rerankers (models with `task: rerank`).

- TEI `POST /rerank`: `{query, texts, raw_scores, return_text, truncate,
  truncation_direction, model}` -> `[{index, score, text?}]`, best first.
- `POST /v1/rerank` (Cohere and Jina shape, what LangChain, LlamaIndex and Haystack reranker
  clients send): `{model, query, documents (strings or {text}), top_n, return_documents}`
  -> `{id, model, results: [{index, relevance_score, document?}], usage, meta}`.

The pairs go through the engine like any other inputs (admission, batching under the token
budget, a large request queued a chunk at a time). Scores are the model's logit through its
activation (sigmoid for one label, as `CrossEncoder.predict`); TEI's `raw_scores` returns the
logit itself. An LLM reranker's logit is its "yes" logit less its "no" logit (its sigmoid:
the card's probability of "yes"); `instruction` replaces its default task on both routes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from embedsvc.api.bodies import RerankBody, TEIRerankBody
from embedsvc.api.calls import Call, Context, Route
from embedsvc.api.service import Service
from embedsvc.engine import EmbedRequest, EmbedResult, ModelEngine, Pairs
from embedsvc.errors import EmptyInputError


def scores(engine: ModelEngine, result: EmbedResult, raw: bool) -> np.ndarray:
    logits = result.scores
    if raw or engine.info.score_activation == "identity":
        return logits
    return 1.0 / (1.0 + np.exp(-logits))


def pairs_request(
    service: Service,
    model: str | None,
    query: str,
    docs: list[str],
    truncate: bool | None,
    param: str,
    ctx: Context,
    instruction: str | None = None,
) -> tuple[ModelEngine, EmbedRequest]:
    engine = service.engine_set().get(model, task="rerank")
    if not docs:
        raise EmptyInputError(f"{param} is empty", param=param)
    if not query:
        raise EmptyInputError("query is an empty string", param="query")
    req = EmbedRequest(
        Pairs(query, docs),
        prompt_name=None,
        instruction=instruction,
        normalize=False,
        truncate=truncate,
        input_param=param,
        request_id=ctx.request_id,
        timeout=ctx.timeout,
    )
    return engine, req


def tei_rerank(service: Service, body: TEIRerankBody, ctx: Context) -> Call:
    engine, req = pairs_request(
        service, body.model, body.query, body.texts, body.truncate, "texts", ctx, body.instruction
    )

    def render(result: EmbedResult) -> bytes:
        s = scores(engine, result, body.raw_scores)
        out: list[dict[str, Any]] = []
        for i in np.argsort(-s, kind="stable"):
            item: dict[str, Any] = {"index": int(i), "score": float(s[i])}
            if body.return_text:
                item["text"] = body.texts[i]
            out.append(item)
        return orjson.dumps(out)

    return Call(engine, req, render)


def rerank(service: Service, body: RerankBody, ctx: Context) -> Call:
    docs = [d if isinstance(d, str) else d.text for d in body.documents]
    engine, req = pairs_request(
        service, body.model, body.query, docs, body.truncate, "documents", ctx, body.instruction
    )

    def render(result: EmbedResult) -> bytes:
        s = scores(engine, result, raw=False)
        results: list[dict[str, Any]] = []
        for i in np.argsort(-s, kind="stable")[: body.top_n]:
            item: dict[str, Any] = {"index": int(i), "relevance_score": float(s[i])}
            if body.return_documents:
                item["document"] = {"text": docs[i]}
            results.append(item)
        payload = {
            "id": ctx.request_id,
            "model": body.model or engine.name,
            "results": results,
            "usage": {"total_tokens": result.prompt_tokens},
            "meta": {"billed_units": {"search_units": 1}},
        }
        return orjson.dumps(payload)

    return Call(engine, req, render)


ROUTES = [
    Route("/rerank", TEIRerankBody, tei_rerank, "Rerank texts against a query (TEI)", "Rerank"),
    Route("/v1/rerank", RerankBody, rerank,
          "Rerank documents against a query (Cohere / Jina)", "Rerank", metric="/rerank"),
]  # fmt: skip
