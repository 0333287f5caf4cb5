"""Response bodies of the embedding routes, built once from the result's array."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from embedsvc.api.precision import INTEGER_FORMATS, Calibration, quantize
from embedsvc.engine import EmbedResult
from embedsvc.engine.sparse import SparseRow

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def to_base64(row: np.ndarray, dtype: str = "<f4") -> str:
    """Standard base64 of little-endian float32 bytes (what the openai client decodes), or
    of float16 (`dtype` "<f2")."""
    return base64.b64encode(np.ascontiguousarray(row, dtype=dtype).data).decode("ascii")


_BASE64_DTYPES = {"base64": "<f4", "base64_float16": "<f2"}


def tei_embed_body(
    result: EmbedResult, encoding_format: str = "float", calibration: Calibration | None = None
) -> bytes:
    vectors = result.vectors
    if encoding_format in INTEGER_FORMATS:
        vectors = quantize(vectors, encoding_format, calibration or {})
    return orjson.dumps(vectors, option=_NUMPY)


def sparse_body(rows: list[SparseRow]) -> bytes:
    """TEI's sparse shape: per input, [{"index", "value"}] for each non-zero entry, by
    index (the engine's sparse rows: SPLADE weights or BGE-M3 lexical weights)."""
    return orjson.dumps(
        [
            [{"index": i, "value": v} for i, v in zip(idx.tolist(), val.tolist(), strict=True)]
            for idx, val in rows
        ]
    )


def multivector_body(result: EmbedResult, encoding_format: str) -> bytes:
    """Per input its token vectors: lists of floats, or one base64 string of its matrix."""
    rows = result.tokens or []
    dtype = _BASE64_DTYPES.get(encoding_format)
    if dtype is not None:
        return orjson.dumps([to_base64(row.ravel(), dtype) for row in rows])
    return orjson.dumps(rows, option=_NUMPY)


def encode_body(result: EmbedResult, outputs: tuple[str, ...], encoding_format: str) -> bytes:
    """/encode: per input an object with the outputs asked."""
    n = len(result.input_tokens) or len(result.vectors)
    items: list[dict[str, Any]] = [{} for _ in range(n)]
    dtype = _BASE64_DTYPES.get(encoding_format)
    if "dense" in outputs:
        for item, row in zip(items, result.vectors, strict=True):
            item["dense"] = to_base64(row, dtype) if dtype else row
    if "sparse" in outputs:
        for item, (idx, val) in zip(items, result.sparse or [], strict=True):
            pairs = zip(idx.tolist(), val.tolist(), strict=True)
            item["sparse"] = [{"index": i, "value": v} for i, v in pairs]
    if "multivector" in outputs:
        for item, rows in zip(items, result.tokens or [], strict=True):
            item["multivector"] = to_base64(rows.ravel(), dtype) if dtype else rows
    return orjson.dumps(items, option=_NUMPY)


def openai_embeddings_body(
    result: EmbedResult,
    encoding_format: str,
    model: str,
    calibration: Calibration | None = None,
) -> bytes:
    data: list[dict[str, Any]]
    if encoding_format in INTEGER_FORMATS:
        data = [
            {"object": "embedding", "index": i, "embedding": row}
            for i, row in enumerate(quantize(result.vectors, encoding_format, calibration or {}))
        ]
    elif encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": to_base64(row)}
            for i, row in enumerate(result.vectors)
        ]
    else:
        data = [
            {"object": "embedding", "index": i, "embedding": row}
            for i, row in enumerate(result.vectors)
        ]
    tokens = result.prompt_tokens
    payload = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(payload, option=_NUMPY)


_TIMING = (
    b"x-total-time: %.3f\r\nx-tokenization-time: %.3f\r\nx-queue-time: %.3f\r\n"
    b"x-inference-time: %.3f\r\nx-compute-tokens: %d\r\n"
)


def timing_lines(r: EmbedResult) -> bytes:
    """Timing headers on every embedding response (milliseconds, as TEI sends them), as
    header lines: one formatting for all of them; and x-truncated-inputs, the number of
    inputs cut to the model's limit, when any was (the default truncates, as TEI's)."""
    lines = _TIMING % (
        r.total_time * 1000,
        r.tokenization_time * 1000,
        r.queue_time * 1000,
        r.inference_time * 1000,
        r.prompt_tokens,
    )
    return lines + b"x-truncated-inputs: %d\r\n" % r.truncated if r.truncated else lines
