"""Which model gives what a request wants (engine/types.Want), checked in the front end
before tokenizing; the 422 for one that does not names the model or route that does."""

from __future__ import annotations

from typing import NoReturn

from embedsvc.engine.types import OUTPUT_WANTS, EmbedRequest, ModelInfo, Pairs, Sequences, Want
from embedsvc.errors import ValidationError
from embedsvc.registry import ModelSpec


def check_want(info: ModelInfo, req: EmbedRequest) -> None:
    """The model of `info` gives what `req` wants (a reranker: pairs only); else a 422
    that names a model or route that does."""
    task, want = info.spec.task, req.want
    if isinstance(req.inputs, Sequences) or task == "classify":
        if isinstance(req.inputs, Sequences) and task == "classify":
            return
        _wrong_task(info, req)
    if isinstance(req.inputs, Pairs):
        if task == "rerank":
            return
        _wrong_task(info, req)
    if not want:
        raise ValidationError(
            "outputs is empty: ask for dense, sparse or multivector", param="outputs"
        )
    if want & Want.TOKEN_STATES:
        if task == "embed" and info.states_dimension:
            return
        why = (
            "its backend has no token states (onnx: the graph ends in the pooled vector)"
            if task == "embed"
            else f"it is task {task}, not an embedding model"
        )
        raise ValidationError(
            f"model {info.name} cannot answer /embed_all: {why}; choose an embedding "
            "model on the torch backend (see /info)",
            param="model",
        )
    if task == "rerank":
        _wrong_task(info, req)
    missing = want & ~gives(info.spec)
    if not missing:
        return
    if want is Want.TOKEN_VECTORS:
        raise ValidationError(
            f"model {info.name} has no multi-vector output; choose a ColBERT model (task "
            "multivector) or one with multivector: true in models.yaml (such as bge-m3; "
            "see /info)",
            param="model",
        )
    if len(want) > 1 and task == "embed":  # /encode
        names = [n for n, w in OUTPUT_WANTS.items() if w & missing]
        raise ValidationError(
            f"model {info.name} has no {' or '.join(names)} output (see /info: "
            "lexical_weights, multivector)",
            param="outputs",
        )
    _wrong_task(info, req)


def gives(spec: ModelSpec) -> Want:
    """The outputs of the entry's model (a reranker's logit counts as DENSE)."""
    if spec.task == "sparse":
        return Want.SPARSE
    if spec.task == "multivector":
        return Want.TOKEN_VECTORS
    gives = Want.DENSE
    if spec.lexical_weights:
        gives |= Want.SPARSE
    if spec.multivector:
        gives |= Want.TOKEN_VECTORS
    return gives


def _wrong_task(info: ModelInfo, req: EmbedRequest) -> NoReturn:
    inputs = req.inputs
    asked = (
        "rerank"
        if isinstance(inputs, Pairs)
        else "classify"
        if isinstance(inputs, Sequences)
        else _ASKED.get(req.want, "encode")
    )
    what = {
        "embed": "an embedding model (task embed): it answers /embed and /v1/embeddings",
        "rerank": "a reranker (task rerank): it scores (query, document) pairs on /rerank "
        "and /v1/rerank",
        "sparse": "a sparse encoder (task sparse): it answers /embed_sparse",
        "multivector": "a ColBERT model (task multivector): it answers /embed_multivector",
        "classify": "a classifier (task classify): it answers /predict and /classify",
    }[info.spec.task]
    raise ValidationError(
        f"model {info.name} is {what}, not task {asked}; choose a model of that task (see /info)",
        param="model",
    )


# The task a single output is asked under (error wording); several: "encode".
_ASKED = {
    Want.DENSE: "embed",
    Want.SPARSE: "sparse",
    Want.TOKEN_VECTORS: "multivector",
    Want.TOKEN_STATES: "states",
}
