"""Operations routes: /health, /metrics, /info."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from embedsvc import __version__
from embedsvc.api.errors import error_response
from embedsvc.api.service import Service
from embedsvc.engine import ModelEngine
from embedsvc.engine.calibration import TEXTS as CALIBRATION_TEXTS
from embedsvc.errors import ErrorKind
from embedsvc.memory import allocator


def model_info(e: ModelEngine) -> dict[str, Any]:
    spec, info = e.spec, e.info
    return {
        "name": spec.name,
        "task": spec.task,
        "model_id": spec.hf_id,
        "model_sha": spec.revision,
        "source": spec.source,
        "code_revision": spec.code_revision,
        # Every file it loaded (and its remote code) has the sha256 the models lock records.
        "files_verified": info.files_verified,
        "path": info.path,
        "backend": spec.backend,
        "device": info.device,
        "model_dtype": info.dtype,
        # The dtype and why: dtype auto picks bfloat16 on a CPU with bf16 matrix units
        # when the model's vectors pass the load-time probe (backends/precision.py).
        "precision": info.precision,
        "pooling": info.pooling,
        "dimension": info.dimension,
        # The width of /embed_all's token states (null: the backend has none).
        "hidden_size": info.states_dimension or None,
        "max_input_length": info.max_seq_length,
        "prompts": spec.prompts,
        "query_prompt": spec.query_prompt,
        "passage_prompt": spec.passage_prompt,
        "default_prompt_name": info.default_prompt_name,
        "instruction_template": spec.instruction_template,
        "icl": spec.icl,
        "multivector": "multivector" in spec.outputs,
        # A ColBERT model: what it puts before a query or document (prompt_name query or
        # document), each side's most tokens, query expansion and the skiplist's size.
        "colbert": None
        if info.colbert is None
        else {
            "query_prefix": info.colbert.query_prefix,
            "document_prefix": info.colbert.document_prefix,
            "query_length": info.colbert.query_length,
            "document_length": info.colbert.document_length,
            "query_expansion": info.colbert.expansion,
            "attend_to_expansion_tokens": info.colbert.attend_expansion,
            "skiplist_tokens": len(info.colbert.skip_ids),
        },
        "examples": [{"instruct": i, "query": q, "response": r} for i, q, r in spec.examples],
        "matryoshka_dimensions": list(spec.matryoshka_dims),
        "matryoshka_layer_norm": spec.matryoshka_layer_norm,
        "max_batch_tokens": info.max_batch_tokens,
        "queue_time_estimate": round(e.queue_time_estimate(), 3),
        "ready": e.healthy,
        # int8/uint8 output: each served size's per-dimension range over the fixed
        # calibration texts (engine/calibration.py), measured once when the model loaded.
        "int8_calibration": {
            "texts": len(CALIBRATION_TEXTS),
            "ranges": {
                str(size): {"min": lo, "max": hi} for size, (lo, hi) in info.calibration.items()
            },
        }
        if spec.task == "embed"
        else None,
        "score_activation": info.score_activation or None,
        "labels": list(info.labels) or None,  # a classifier's, in logit order
        # An LLM reranker: the instruction its pairs get when a request sends none.
        "rerank_instruction": spec.judge.instruction if spec.judge else None,
    }


def ops_router() -> APIRouter:
    router = APIRouter(tags=["Operations"])

    @router.get("/health", summary="200 once every model is loaded and warmed, else 503")
    async def health(request: Request) -> Response:
        service: Service = request.app.state.service
        if service.ready:
            return Response(b"", status_code=200)
        reason = service.load_error or "models are still loading"
        if service.engines is not None and not service.engines.ready:
            sick = [e.name for e in service.engines if not e.healthy]
            reason = f"model(s) not healthy: {', '.join(sick)}" if sick else reason
        if service.draining:
            reason = "shutting down"
        return error_response(request.url.path, ErrorKind.UNHEALTHY, reason)

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        service: Service = request.app.state.service
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @router.get("/info", summary="Server and model information (TEI fields plus all models)")
    async def info(request: Request) -> Response:
        service: Service = request.app.state.service
        s = service.settings
        engines = service.engine_set()
        default = engines.default
        body = {
            "model_id": default.spec.hf_id,
            "model_sha": default.spec.revision,
            "model_dtype": default.info.dtype,
            # TEI: the name the OpenAI route answers to (`model`); here the registry name.
            "served_model_name": default.name,
            "model_type": {"embedding": {"pooling": default.info.pooling}},
            "prompts": default.spec.prompts,
            "default_prompt_name": default.info.default_prompt_name,
            "max_concurrent_requests": s.max_concurrent_inputs,
            "max_concurrent_inputs": s.max_concurrent_inputs,
            "max_queue_time": s.max_queue_time,
            "max_input_length": default.info.max_seq_length,
            "max_batch_tokens": default.info.max_batch_tokens,
            "max_batch_requests": s.max_batch_size,
            "max_client_batch_size": s.max_client_batch_size,
            "cache_bytes": s.cache_bytes,
            "auto_truncate": s.auto_truncate,
            "tokenization_workers": s.tokenization_workers,
            "threads": s.cpu_threads(),
            "max_payload_bytes": s.max_payload_bytes,
            "openai_token_ids": s.openai_token_ids,
            "max_input_chars": s.max_input_chars,
            "max_request_tokens": s.max_request_tokens,
            "max_multivector_values": s.max_multivector_values,
            "max_sparse_values": s.max_sparse_values,
            "auth": bool(s.api_key or s.api_key_file),
            "version": __version__,
            "allocator": allocator(),
            "sha": None,
            "docker_label": None,
            "default_model": default.name,
            "models": [model_info(e) for e in engines],
        }
        return Response(orjson.dumps(body), media_type="application/json")

    return router
