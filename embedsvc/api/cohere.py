"""Cohere dialect: POST /v2/embed, Cohere's embed API v2 (its `ClientV2.embed`).

Texts only. `input_type` picks the model's prompt: search_query its query prompt,
search_document its passage prompt, classification and clustering the prompt of that
name where the model has one, else its query prompt (the cards of E5 and BGE embed
symmetric tasks as queries); a model without prompts gets none. `truncate` NONE refuses
an over-long text (422), START cuts its beginning, END its end; left out, the server's
--auto-truncate decides (on by default: END). `max_tokens` lowers the limit a text is
cut or refused at. `embedding_types` are rendered from one forward pass: float, base64
(little-endian float32, as Cohere encodes it), and int8, uint8, binary, ubinary as
`encoding_format` renders them on the other routes (api/precision.py). Errors are
Cohere's shape, {"message": ...} (api/errors.py).
"""

from __future__ import annotations

from typing import Any

import orjson

from embedsvc.api.bodies import CohereEmbedBody
from embedsvc.api.calls import Call, Context, Route
from embedsvc.api.encode import to_base64
from embedsvc.api.precision import check_format, quantize
from embedsvc.api.service import Service
from embedsvc.engine import NO_PROMPT, EmbedRequest, EmbedResult, ModelEngine, Texts
from embedsvc.errors import ValidationError

_TRUNCATE = {"NONE": (False, "right"), "START": (True, "left"), "END": (True, "right")}


def cohere_prompt(engine: ModelEngine, input_type: str | None) -> str | None:
    """The prompt name `input_type` maps to (None: the model's default prompt)."""
    spec = engine.spec
    if input_type is None:
        return None
    if input_type == "search_query":
        name = spec.query_prompt
    elif input_type == "search_document":
        name = spec.passage_prompt
    else:
        kind = input_type  # classification | clustering
        name = kind if kind in spec.prompts else spec.query_prompt
    return name or NO_PROMPT


def embed(service: Service, body: CohereEmbedBody, ctx: Context) -> Call:
    if body.images is not None or body.inputs is not None:
        which = "images" if body.images is not None else "inputs"
        raise ValidationError(
            f"{which} is not supported: this server embeds text; send the texts in `texts`",
            param=which,
        )
    if body.texts is None:
        raise ValidationError("texts is required (a list of strings to embed)", param="texts")
    engine = service.engine_set().get(body.model)
    truncate, direction = (None, "right") if body.truncate is None else _TRUNCATE[body.truncate]
    req = EmbedRequest(
        Texts(body.texts),
        prompt_name=cohere_prompt(engine, body.input_type),
        normalize=True,
        truncate=truncate,
        truncation_direction=direction,
        max_tokens=body.max_tokens,
        dimensions=body.output_dimension,
        input_param="texts",
        request_id=ctx.request_id,
        timeout=ctx.timeout,
    )
    types = list(dict.fromkeys(body.embedding_types))  # each once, in the order asked
    for t in types:
        check_format(t, req.normalize)
    calibration = engine.info.calibration
    texts, rid = body.texts, ctx.request_id

    def render(result: EmbedResult) -> bytes:
        embeddings: dict[str, Any] = {}
        for t in types:
            if t == "float":
                embeddings[t] = result.vectors
            elif t == "base64":
                embeddings[t] = [to_base64(row) for row in result.vectors]
            else:
                embeddings[t] = quantize(result.vectors, t, calibration)
        payload = {
            "id": rid,
            "embeddings": embeddings,
            "texts": texts,
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"input_tokens": result.prompt_tokens},
            },
            "response_type": "embeddings_by_type",
        }
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)

    return Call(engine, req, render)


ROUTES = [Route("/v2/embed", CohereEmbedBody, embed, "Create embeddings (Cohere v2)", "Cohere")]
