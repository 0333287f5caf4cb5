"""TEI dialect: POST /embed (and /), /embed_sparse, /embed_all, /similarity, /tokenize,
/decode; and /embed_multivector, /encode beside them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from embedsvc.api.bodies import (
    EncodeBody,
    SimilarityParameters,
    TEIDecodeBody,
    TEIEmbedAllBody,
    TEIEmbedBody,
    TEIMultivectorBody,
    TEISimilarityBody,
    TEISparseBody,
    TEITokenizeBody,
    convert,
    decode,
    documented,
    example_tuples,
)
from embedsvc.api.calls import Call, Context, Route
from embedsvc.api.encode import encode_body, multivector_body, sparse_body, tei_embed_body
from embedsvc.api.inputs import parse_inputs
from embedsvc.api.precision import check_format
from embedsvc.api.service import Service
from embedsvc.engine import EmbedRequest, EmbedResult, Want, want_of
from embedsvc.errors import EmptyInputError, ValidationError


def embed(service: Service, body: TEIEmbedBody, ctx: Context) -> Call:
    engine = service.engine_set().get(body.model)
    inputs = parse_inputs(body.inputs, "inputs")
    fmt = body.encoding_format
    check_format(fmt, body.normalize)
    req = EmbedRequest(
        inputs,
        prompt_name=body.prompt_name,
        instruction=body.instruction,
        examples=example_tuples(body.examples),
        normalize=body.normalize,
        truncate=body.truncate,
        truncation_direction=body.truncation_direction.lower(),
        dimensions=body.dimensions,
        input_param="inputs",
        request_id=ctx.request_id,
        timeout=ctx.timeout,
    )
    if fmt == "float":
        return Call(engine, req, tei_embed_body)
    calibration = engine.info.calibration
    return Call(engine, req, lambda r: tei_embed_body(r, fmt, calibration))


def embed_sparse(service: Service, body: TEISparseBody, ctx: Context) -> Call:
    """SPLADE weights: the non-zero vocabulary entries of each input, by index."""
    return _token_output(service, body, ctx, "sparse", _sparse)


def embed_multivector(service: Service, body: TEIMultivectorBody, ctx: Context) -> Call:
    """Token vectors: BGE-M3's ColBERT output (models with multivector: true)."""
    fmt = body.encoding_format
    return _token_output(service, body, ctx, "multivector", lambda r: multivector_body(r, fmt))


def embed_all(service: Service, body: TEIEmbedAllBody, ctx: Context) -> Call:
    """TEI's /embed_all: each input's token states (any embedding model on torch)."""
    fmt = body.encoding_format
    render = lambda r: multivector_body(r, fmt)  # noqa: E731
    return _token_output(service, body, ctx, "states", render)


def _token_output(
    service: Service,
    body: TEISparseBody | TEIMultivectorBody,
    ctx: Context,
    task: Literal["sparse", "multivector", "states"],
    render: Callable[[EmbedResult], bytes],
) -> Call:
    """The call of a route whose answer is not a pooled vector (no normalize, no sizes)."""
    engine = service.engine_set().get(body.model, task="embed" if task == "states" else task)
    req = EmbedRequest(
        parse_inputs(body.inputs, "inputs"),
        want=_TOKEN_OUTPUTS[task],
        prompt_name=body.prompt_name,
        normalize=False,
        truncate=body.truncate,
        truncation_direction=body.truncation_direction.lower(),
        input_param="inputs",
        request_id=ctx.request_id,
        timeout=ctx.timeout,
    )
    return Call(engine, req, render)


def encode(service: Service, body: EncodeBody, ctx: Context) -> Call:
    """Several outputs from one forward pass per input (BGE-M3: dense, sparse, multivector)."""
    engine = service.engine_set().get(body.model)
    outputs = tuple(dict.fromkeys(body.outputs))  # each once, in the order asked
    req = EmbedRequest(
        parse_inputs(body.inputs, "inputs"),
        want=want_of(outputs),
        prompt_name=body.prompt_name,
        normalize=body.normalize,
        truncate=body.truncate,
        truncation_direction=body.truncation_direction.lower(),
        dimensions=body.dimensions,
        input_param="inputs",
        request_id=ctx.request_id,
        timeout=ctx.timeout,
    )
    fmt = body.encoding_format
    return Call(engine, req, lambda r: encode_body(r, outputs, fmt))


_TOKEN_OUTPUTS = {
    "sparse": Want.SPARSE,
    "multivector": Want.TOKEN_VECTORS,
    "states": Want.TOKEN_STATES,
}


def _sparse(result: EmbedResult) -> bytes:
    assert result.sparse is not None
    return sparse_body(result.sparse)


def similarity(service: Service, body: TEISimilarityBody, ctx: Context) -> Call:
    """Cosine similarity of `source_sentence` to each of `sentences`."""
    engine = service.engine_set().get(body.model)
    params = body.parameters or SimilarityParameters()
    sentences = body.inputs.sentences
    if not sentences:
        raise EmptyInputError("inputs.sentences is empty", param="inputs.sentences")
    texts = [body.inputs.source_sentence, *sentences]
    req = EmbedRequest(
        parse_inputs(texts, "inputs"),
        prompt_name=params.prompt_name,
        truncate=params.truncate,
        truncation_direction=params.truncation_direction.lower(),
        input_param="inputs",
        request_id=ctx.request_id,
        timeout=ctx.timeout,
    )
    return Call(engine, req, _cosines)


def _cosines(result: EmbedResult) -> bytes:
    scores = result.vectors[1:] @ result.vectors[0]  # normalized: dot = cosine
    return orjson.dumps(scores.astype(float).tolist())


def root(service: Service, body: TEIEmbedBody, ctx: Context) -> Call:
    """/embed, or /similarity when `inputs` is {source_sentence, sentences}: the two
    tasks the Hugging Face Inference API posts to a model's base URL."""
    if isinstance(body.inputs, dict):
        raw = {"inputs": body.inputs, "parameters": body.parameters, "model": body.model}
        return similarity(service, convert(TEISimilarityBody, raw), ctx)
    return embed(service, body, ctx)


ROUTES = [
    Route("/embed", TEIEmbedBody, embed, "Embed inputs (TEI)", "TEI"),
    Route("/", TEIEmbedBody, root,
          "Alias of /embed; /similarity for {source_sentence, sentences}", "TEI",
          name="embed_root"),
    Route("/embed_multivector", TEIMultivectorBody, embed_multivector,
          "Token vectors of inputs (multi-vector, ColBERT)", "TEI"),
    Route("/embed_all", TEIEmbedAllBody, embed_all,
          "Token states of inputs, not pooled (TEI)", "TEI"),
    Route("/encode", EncodeBody, encode,
          "Dense, sparse and multi-vector outputs of inputs from one pass", "TEI"),
    Route("/embed_sparse", TEISparseBody, embed_sparse,
          "Sparse (SPLADE) weights of inputs (TEI)", "TEI"),
    Route("/similarity", TEISimilarityBody, similarity,
          "Similarity of a sentence to others (TEI)", "TEI"),
]  # fmt: skip


def tei_router() -> APIRouter:
    """The TEI routes that need no forward pass (tokenizer work only)."""
    router = APIRouter(tags=["TEI"])

    @router.post(
        "/tokenize", summary="Tokenize inputs (TEI)", openapi_extra=documented(TEITokenizeBody)
    )
    async def tokenize(request: Request) -> Response:
        body = decode(TEITokenizeBody, await request.body())
        engine = request.app.state.service.engine_set().get(body.model)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not texts:
            raise EmptyInputError("inputs is empty", param="inputs")
        parse_inputs(texts, "inputs")
        rows = await engine.tokenize(texts, body.prompt_name, body.add_special_tokens)
        out = [
            [
                {"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop}
                for t in row
            ]
            for row in rows
        ]
        return Response(orjson.dumps(out), media_type="application/json")

    @router.post(
        "/decode", summary="Decode token ids (TEI)", openapi_extra=documented(TEIDecodeBody)
    )
    async def decode_ids(request: Request) -> Response:
        body = decode(TEIDecodeBody, await request.body())
        engine = request.app.state.service.engine_set().get(body.model)
        if not body.ids:
            raise EmptyInputError("ids is empty", param="ids")
        seqs = _id_lists(body.ids)
        texts = engine.decode(seqs, skip_special_tokens=body.skip_special_tokens)
        return Response(orjson.dumps(texts), media_type="application/json")

    return router


def _id_lists(ids: list[Any]) -> list[list[int]]:
    """[int] or [[int]] (no booleans), as lists of ids."""

    def is_int(v: Any) -> bool:
        return type(v) is int

    if all(is_int(v) for v in ids):
        return [list(ids)]
    if all(isinstance(s, list) for s in ids):
        for i, s in enumerate(ids):
            if not s:
                raise ValidationError("ids contains an empty list", param="ids")
            if not all(is_int(v) for v in s):
                raise ValidationError(f"ids[{i}] must hold integers only", param="ids")
        return [list(s) for s in ids]
    raise ValidationError("ids must be a list of token ids or a list of such lists", param="ids")
