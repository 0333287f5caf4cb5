"""TEI dialect: POST /embed (and /), /embed_sparse, /similarity, /tokenize, /decode."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError
from starlette.responses import Response

from embedsvc.api.encode import sparse_body, tei_embed_body, timing_headers
from embedsvc.api.errors import describe_validation_errors
from embedsvc.api.inputs import INPUTS_SCHEMA, parse_inputs
from embedsvc.api.precision import check_format
from embedsvc.api.service import Service
from embedsvc.engine import EmbedRequest
from embedsvc.errors import EmptyInputError, ValidationError

TRUNCATION_DIRECTIONS = ("Left", "Right", "left", "right")


class TEIEmbedBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Any = Field(json_schema_extra=INPUTS_SCHEMA)
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: StrictStr | None = None
    dimensions: StrictInt | None = Field(default=None, gt=0)
    model: StrictStr | None = None
    encoding_format: Literal["float", "int8", "uint8", "binary", "ubinary"] = "float"
    parameters: Any = Field(default=None, description="similarity parameters (POST / only)")


class TEISparseBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Any = Field(json_schema_extra=INPUTS_SCHEMA)
    truncate: StrictBool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: StrictStr | None = None
    model: StrictStr | None = None


class SimilarityInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_sentence: StrictStr
    sentences: list[StrictStr]


class SimilarityParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    truncate: StrictBool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: StrictStr | None = None


class TEISimilarityBody(BaseModel):
    """TEI's /similarity (and the Hugging Face Inference API's sentence-similarity task,
    which `huggingface_hub.InferenceClient.sentence_similarity` posts to the base URL)."""

    model_config = ConfigDict(extra="ignore")

    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None
    model: StrictStr | None = None


class TEITokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: StrictStr | list[StrictStr]
    add_special_tokens: StrictBool = True
    prompt_name: StrictStr | None = None
    model: StrictStr | None = None


class TEIDecodeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[StrictInt] | list[list[StrictInt]]
    skip_special_tokens: StrictBool = True
    model: StrictStr | None = None


def tei_router() -> APIRouter:
    router = APIRouter(tags=["TEI"])

    async def embed(body: TEIEmbedBody, request: Request) -> Response:
        service: Service = request.app.state.service
        engine = service.engine_set().get(body.model)
        texts, ids = parse_inputs(body.inputs, "inputs")
        check_format(body.encoding_format, body.normalize)
        req = EmbedRequest(
            texts=texts,
            token_ids=ids,
            prompt_name=body.prompt_name,
            normalize=body.normalize,
            truncate=body.truncate,
            truncation_direction=body.truncation_direction.lower(),
            dimensions=body.dimensions,
            input_param="inputs",
            request_id=getattr(request.state, "request_id", ""),
            timeout=getattr(request.state, "request_timeout", None),
        )
        result = await service.embed(request, engine, req)
        engine.metrics.requests["/embed"].inc()
        return Response(
            tei_embed_body(result, body.encoding_format, engine.info.calibration),
            media_type="application/json",
            headers=timing_headers(result),
        )

    router.add_api_route(
        "/embed", embed, methods=["POST"], summary="Embed inputs (TEI)",
        response_class=Response,
    )  # fmt: skip

    async def embed_sparse(body: TEISparseBody, request: Request) -> Response:
        """SPLADE weights: the non-zero vocabulary entries of each input, by index."""
        service: Service = request.app.state.service
        engine = service.engine_set().get(body.model, task="sparse")
        texts, ids = parse_inputs(body.inputs, "inputs")
        req = EmbedRequest(
            texts=texts,
            token_ids=ids,
            task="sparse",
            prompt_name=body.prompt_name,
            normalize=False,
            truncate=body.truncate,
            truncation_direction=body.truncation_direction.lower(),
            input_param="inputs",
            request_id=getattr(request.state, "request_id", ""),
            timeout=getattr(request.state, "request_timeout", None),
        )
        result = await service.embed(request, engine, req)
        engine.metrics.requests["/embed_sparse"].inc()
        assert result.sparse is not None
        return Response(
            sparse_body(result.sparse),
            media_type="application/json",
            headers=timing_headers(result),
        )

    router.add_api_route(
        "/embed_sparse", embed_sparse, methods=["POST"], response_class=Response,
        summary="Sparse (SPLADE) weights of inputs (TEI)",
    )  # fmt: skip

    async def similarity(body: TEISimilarityBody, request: Request) -> Response:
        """Cosine similarity of `source_sentence` to each of `sentences`."""
        service: Service = request.app.state.service
        engine = service.engine_set().get(body.model)
        params = body.parameters or SimilarityParameters()
        sentences = body.inputs.sentences
        if not sentences:
            raise EmptyInputError("inputs.sentences is empty", param="inputs.sentences")
        texts = [body.inputs.source_sentence, *sentences]
        parse_inputs(texts, "inputs")
        req = EmbedRequest(
            texts=texts,
            prompt_name=params.prompt_name,
            truncate=params.truncate,
            truncation_direction=params.truncation_direction.lower(),
            input_param="inputs",
            request_id=getattr(request.state, "request_id", ""),
            timeout=getattr(request.state, "request_timeout", None),
        )
        result = await service.embed(request, engine, req)
        engine.metrics.requests["/similarity"].inc()
        scores = result.vectors[1:] @ result.vectors[0]  # normalized: dot = cosine
        return Response(
            orjson.dumps(scores.astype(float).tolist()),
            media_type="application/json",
            headers=timing_headers(result),
        )

    async def root(body: TEIEmbedBody, request: Request) -> Response:
        """/embed, or /similarity when `inputs` is {source_sentence, sentences}: the two
        tasks the Hugging Face Inference API posts to a model's base URL."""
        if isinstance(body.inputs, dict):
            raw = {"inputs": body.inputs, "parameters": body.parameters, "model": body.model}
            try:
                sim = TEISimilarityBody.model_validate(raw)
            except PydanticValidationError as e:
                message, param = describe_validation_errors(e.errors())
                raise ValidationError(message, param=param) from None
            return await similarity(sim, request)
        return await embed(body, request)

    router.add_api_route(
        "/similarity", similarity, methods=["POST"], response_class=Response,
        summary="Similarity of a sentence to others (TEI)",
    )  # fmt: skip
    router.add_api_route(
        "/", root, methods=["POST"], response_class=Response, include_in_schema=True,
        summary="Alias of /embed; /similarity for {source_sentence, sentences}",
        name="embed_root",
    )  # fmt: skip

    @router.post("/tokenize", summary="Tokenize inputs (TEI)")
    async def tokenize(body: TEITokenizeBody, request: Request) -> Response:
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

    @router.post("/decode", summary="Decode token ids (TEI)")
    async def decode(body: TEIDecodeBody, request: Request) -> Response:
        engine = request.app.state.service.engine_set().get(body.model)
        if not body.ids:
            raise EmptyInputError("ids is empty", param="ids")
        seqs: list[list[int]] = (
            [list(body.ids)] if isinstance(body.ids[0], int) else [list(s) for s in body.ids]
        )
        if any(not s for s in seqs):
            raise ValidationError("ids contains an empty list", param="ids")
        texts = engine.decode(seqs, skip_special_tokens=body.skip_special_tokens)
        return Response(orjson.dumps(texts), media_type="application/json")

    return router
