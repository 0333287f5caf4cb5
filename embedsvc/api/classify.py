"""Sequence classification (models with `task: classify`): TEI's POST /predict and the
POST /classify of vLLM and Infinity.

- `/predict` (TEI): `inputs` is a text, a pair `[text, text]`, or a batch of texts and
  pairs `[[text], [text, text], ...]`; the answer is, per input, every label with its
  score, best first (a list for one input, a list of lists for a batch). `raw_scores`
  gives the logits.
- `/classify` (vLLM, Infinity): `input` is a text or a list of texts; the answer is
  `{id, object, created, model, data: [{index, label, probs, num_classes}], usage}` with
  `probs` in label order and `label` the best.

Scores are what transformers' `pipeline("text-classification", top_k=None)` gives: the
logits through softmax, or through a sigmoid for a one-label or multi-label model (TEI
applies softmax to a multi-label model too; the pipeline's rule is the model's meaning).
Pairs are tokenized as the tokenizer takes two sequences (NLI, the pipeline's
`{"text", "text_pair"}`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson

from embedsvc.api.bodies import ClassifyBody, TEIPredictBody
from embedsvc.api.calls import Call, Context, Route
from embedsvc.api.service import Service
from embedsvc.engine import EmbedRequest, EmbedResult, ModelEngine, Sequences
from embedsvc.errors import EmptyInputError, ValidationError

Item = str | tuple[str, str]
_PREDICT_SHAPES = "a string, a pair [string, string], or a batch [[string] | [string, string], ...]"


def probabilities(engine: ModelEngine, result: EmbedResult, raw: bool) -> np.ndarray:
    """Each input's score per label, float64 [n, labels]."""
    logits = result.vectors.astype(np.float64)
    if raw or engine.info.score_activation == "identity":
        return logits
    if engine.info.score_activation == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def predict_items(value: Any) -> tuple[list[Item], bool]:
    """The texts and pairs of TEI's `inputs`, and whether it was a batch."""
    if isinstance(value, str):
        return [value], False
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise ValidationError(f"inputs must be {_PREDICT_SHAPES}; got {got}", param="inputs")
    if all(isinstance(v, str) for v in value):
        if len(value) > 2:
            raise ValidationError(
                f"inputs has {len(value)} strings: a list of strings is one pair [string, "
                "string]; send a batch as [[string], [string], ...]",
                param="inputs",
            )
        return [value[0] if len(value) == 1 else (value[0], value[1])], False
    items: list[Item] = []
    for i, v in enumerate(value):
        if (
            not isinstance(v, list)
            or not 1 <= len(v) <= 2
            or not all(isinstance(s, str) for s in v)
        ):
            raise ValidationError(
                f"inputs[{i}] must be [string] or [string, string] in a batch; inputs must "
                f"be {_PREDICT_SHAPES}",
                param="inputs",
            )
        items.append(v[0] if len(v) == 1 else (v[0], v[1]))
    return items, True


def classify_request(
    service: Service,
    model: str | None,
    items: list[Item],
    truncate: bool | None,
    direction: str,
    param: str,
    ctx: Context,
) -> tuple[ModelEngine, EmbedRequest]:
    engine = service.engine_set().get(model, task="classify")
    if not items:
        raise EmptyInputError(f"{param} is empty", param=param)
    req = EmbedRequest(
        Sequences(items),
        normalize=False,
        truncate=truncate,
        truncation_direction=direction.lower(),
        input_param=param,
        request_id=ctx.request_id,
        timeout=ctx.timeout,
    )
    return engine, req


def predict(service: Service, body: TEIPredictBody, ctx: Context) -> Call:
    items, batch = predict_items(body.inputs)
    engine, req = classify_request(
        service, body.model, items, body.truncate, body.truncation_direction, "inputs", ctx
    )
    labels = engine.info.labels

    def render(result: EmbedResult) -> bytes:
        rows = []
        for scores in probabilities(engine, result, body.raw_scores):
            order = np.argsort(-scores, kind="stable")
            rows.append([{"score": float(scores[k]), "label": labels[k]} for k in order])
        return orjson.dumps(rows if batch else rows[0])

    return Call(engine, req, render)


def classify(service: Service, body: ClassifyBody, ctx: Context) -> Call:
    value = body.input
    ok = isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )
    if not ok:
        raise ValidationError("input must be a string or a list of strings", param="input")
    items: list[Item] = [value] if isinstance(value, str) else list(value)
    engine, req = classify_request(service, body.model, items, body.truncate, "right", "input", ctx)
    labels, name = engine.info.labels, body.model or engine.name

    def render(result: EmbedResult) -> bytes:
        data: list[dict[str, Any]] = []
        for i, probs in enumerate(probabilities(engine, result, raw=False)):
            best = int(np.argmax(probs))
            data.append(
                {"index": i, "label": labels[best], "probs": probs, "num_classes": len(labels)}
            )
        tokens = result.prompt_tokens
        payload = {
            "id": f"classify-{ctx.request_id}",
            "object": "list",
            "created": int(time.time()),
            "model": name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)

    return Call(engine, req, render)


ROUTES = [
    Route("/predict", TEIPredictBody, predict, "Classify texts and pairs (TEI)", "Classify"),
    Route("/classify", ClassifyBody, classify, "Classify texts (vLLM, Infinity)", "Classify"),
]
