"""ColBERT (late-interaction) models, task multivector: a transformer and its projection of
every token, one vector per token.

The folder is read by sentence-transformers' `MultiVectorEncoder`, which knows PyLate's saved
format (query/document markers, per-side lengths, query expansion, the punctuation
skiplist) and its own; what it found becomes a `ColbertFormat` the engine applies. A pass runs
the encoder and the Dense projection(s) on the engine's batch. A pipeline with any other
module (token pooling, an image processor) is refused at start: embedsvc serves no model it
cannot compute exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from embedsvc.backends import bert
from embedsvc.backends.base import (
    BackendSpec,
    ColbertFormat,
    ForwardOutput,
    LoadedModel,
    PaddedBatch,
)
from embedsvc.backends.torch_common import (
    TorchThreads,
    guarded,
    load_sentence_transformers,
    log_loaded,
    place,
    trace_states,
)
from embedsvc.errors import ConfigError

log = logging.getLogger(__name__)


class ColbertBackend(TorchThreads):
    """`modules`: the Transformer module then the Dense projections, run on feature dicts
    as sentence-transformers runs them. Every pass gives token vectors of every position;
    `pooled` is empty ([batch, 0]): these models have no sentence vector. `encoder`, where
    the folder's transformer is a BERT-family one (backends/bert.py), runs in place of the
    Transformer module on the batches whose every position is attended or padding (it
    computes the attended positions only): documents, and queries whose expansion the
    model attends to."""

    token_vectors = True
    token_vectors_from = 0

    def __init__(
        self, modules: list[Any], device: str, dtype: str, dimension: int, encoder: Any = None
    ) -> None:
        self._modules = modules
        self._encoder = encoder
        self.device = device
        self.dtype = dtype
        self.dimension = dimension

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        import torch

        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(batch.input_ids).to(self.device),
            "attention_mask": torch.from_numpy(batch.attention_mask).to(self.device),
        }

        def run() -> np.ndarray:
            f, modules = features, self._modules
            if self._encoder is not None and not batch.unattended:
                f["token_embeddings"] = self._encoder(f["input_ids"], f["attention_mask"])
                modules = modules[1:]
            for module in modules:
                f = module(f)
            return f["token_embeddings"].to(torch.float32).cpu().numpy()

        vectors = guarded(self.device, run)
        return ForwardOutput(np.zeros((vectors.shape[0], 0), np.float32), token_vectors=vectors)


def load_colbert(spec: BackendSpec, path: Path) -> LoadedModel:
    import torch
    from sentence_transformers import MultiVectorEncoder

    device, dtype = place(spec, path)
    mve = load_sentence_transformers(spec, path, MultiVectorEncoder, device, dtype)
    if dtype != "float32":
        mve.to(getattr(torch, dtype))  # the projections too, not only the transformer
    modules, fmt = _pipeline(spec.name, mve, spec.max_seq_length)
    encoder = _own_encoder(spec, path, device, dtype)
    backend_tokenizer = getattr(mve.tokenizer, "backend_tokenizer", None)
    if backend_tokenizer is None:
        raise ConfigError(f"model {spec.name}: needs a fast tokenizer (tokenizer.json)")
    # The tokenizer as the model left it: the markers registered as single special tokens.
    tokenizer = Tokenizer.from_str(backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    pad_id = mve.tokenizer.pad_token_id
    dimension = _dimension(spec.name, modules)
    log_loaded(
        spec,
        path,
        device,
        dtype,
        f"ColBERT, {dimension} dims per token, queries {fmt.query_length} tokens (expansion "
        f"to {fmt.expansion}), documents {fmt.document_length} tokens, {len(fmt.skip_ids)} "
        "skiplist tokens",
    )
    return LoadedModel(
        path=path,
        backend=ColbertBackend(modules, device, dtype, dimension, encoder),
        tokenizer=tokenizer,
        max_seq_length=max(fmt.query_length, fmt.document_length),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        pooling="none",
        colbert=fmt,
    )


def _own_encoder(spec: BackendSpec, path: Path, device: str, dtype: str) -> Any:
    """The own BERT encoder of the folder's transformer (traced where the trace matches), or
    None where backends/bert.py does not compute it exactly."""
    p = None if spec.trust_remote_code else bert.encoder_plan(path)
    if p is None:
        return None
    try:
        encoder = bert.build(p, device, dtype)
    except ValueError as e:  # weights named otherwise: the library's module runs
        log.info(
            "model %s: %s; its transformer runs as sentence-transformers runs it", spec.name, e
        )
        return None
    return trace_states(encoder, device) or encoder


def _pipeline(name: str, mve: Any, serving_limit: int | None) -> tuple[list[Any], ColbertFormat]:
    """The modules a pass runs and the format the engine applies; ConfigError for a
    pipeline embedsvc does not compute exactly. Over 80 lines (a reason): one check per
    module of sentence-transformers' ColBERT pipeline, read in the pipeline's order."""
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    modules = list(mve)
    kinds = [type(m).__name__ for m in modules]
    refuse = f"model {name}: a ColBERT pipeline of {' -> '.join(kinds)} is not served"
    if not modules or not isinstance(modules[0], Transformer):
        raise ConfigError(f"{refuse}: it must start with a Transformer")
    transformer = modules[0]
    k = 1
    while k < len(modules) and isinstance(modules[k], Dense):
        dense = modules[k]
        if getattr(dense, "module_input_name", "token_embeddings") != "token_embeddings":
            raise ConfigError(f"{refuse}: its Dense module reads sentence vectors")
        k += 1
    mask = modules[k] if k < len(modules) and isinstance(modules[k], MultiVectorMask) else None
    k += mask is not None
    normalize = k < len(modules) and isinstance(modules[k], Normalize)
    k += normalize
    if k != len(modules):
        raise ConfigError(
            f"{refuse}: {kinds[k]} is not computed here (Transformer, Dense projections, "
            "MultiVectorMask and Normalize are)"
        )
    if mask is not None and mask.keep_only_token_ids:
        raise ConfigError(f"{refuse}: keep_only_token_ids (image documents) is not served")
    if getattr(mve, "truncate_dim", None):
        raise ConfigError(f"{refuse}: truncate_dim is not served")
    prompts = dict(getattr(mve, "prompts", None) or {})
    unknown = sorted(set(prompts) - {"query", "document"})
    if unknown or getattr(mve, "default_prompt_name", None):
        raise ConfigError(f"{refuse}: prompts other than query and document ({unknown})")
    config = getattr(transformer, "auto_model", None)
    positions = int(getattr(getattr(config, "config", None), "max_position_embeddings", 0) or 0)

    def side_length(length: int | None) -> int:
        # A side's own length replaces the transformer's max_seq_length, as the library
        # tokenizes (PyLate saves max_seq_length one below it, the marker's room); the
        # position table and the entry's max_seq_length still bound it.
        limits = [v for v in (length or transformer.max_seq_length, serving_limit, positions) if v]
        if not limits:
            raise ConfigError(f"model {name}: set max_seq_length in models.yaml")
        return int(min(limits))

    document = side_length(transformer.document_length)
    query = side_length(transformer.query_length)
    expansion = transformer.query_expansion
    width = expansion_id = 0
    attend = False
    if expansion is not None:
        width = int(expansion["length"])
        # "fixed": the expansion length is every query's length; "min": its floor only.
        query = width if expansion["strategy"] == "fixed" else max(query, width)
        tok = mve.tokenizer
        token = expansion.get("token")
        found = tok.convert_tokens_to_ids(token) if token else tok.mask_token_id
        if found is None:
            found = tok.eos_token_id
        if found is None:
            raise ConfigError(f"{refuse}: no token to expand queries with")
        expansion_id, attend = int(found), bool(expansion["attend"])
    skip: tuple[int, ...] = ()
    tasks: list[str] = []
    if mask is not None:
        skip = _skiplist_ids(mve.tokenizer, mask.skiplist_words)
        tasks = list(mask.skiplist_tasks)
    fmt = ColbertFormat(
        query_prefix=prompts.get("query", ""),
        document_prefix=prompts.get("document", ""),
        query_length=query,
        document_length=document,
        expansion=width,
        expansion_id=expansion_id,
        attend_expansion=attend,
        skip_ids=skip,
        skip_query="query" in tasks,
        skip_document="document" in tasks,
        normalize=normalize,
    )
    return modules[: 1 + sum(isinstance(m, Dense) for m in modules)], fmt


def _skiplist_ids(tokenizer: Any, words: list[str]) -> tuple[int, ...]:
    """The skiplist's token ids as MultiVectorMask resolves them: a word that is not one
    token of the vocabulary (the tokenizer gives [UNK] for it) is left out, so real [UNK]
    tokens keep their vectors."""
    unk_id, unk = tokenizer.unk_token_id, tokenizer.unk_token
    ids = ((w, tokenizer.convert_tokens_to_ids(w)) for w in words)
    return tuple(int(i) for w, i in ids if i is not None and (i != unk_id or w == unk))


def _dimension(name: str, modules: list[Any]) -> int:
    for module in reversed(modules):
        get = getattr(module, "get_embedding_dimension", None) or getattr(
            module, "get_word_embedding_dimension", None
        )
        if get is not None and get():
            return int(get())
    raise ConfigError(f"model {name}: cannot tell the token vectors' dimension")
