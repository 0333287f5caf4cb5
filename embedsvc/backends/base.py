"""The backend contract: the batch a forward pass takes, what a loaded model offers, and
what loading needs of a models.yaml entry. Types only: loaders.py picks the loader."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer

from embedsvc.registry import (
    BackendName,
    Device,
    Dtype,
    JudgePrompt,
    ModelSpec,
    OnnxVariant,
    Pooling,
    Task,
)


@dataclass
class PaddedBatch:
    """Right-padded token ids of one forward pass."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]
    token_vectors: bool = False  # the pass's output carries token vectors (some job asks)
    token_states: bool = False  # and the last hidden states (some job asks: /embed_all)
    # Some row has positions past its attended ones that are not padding (a ColBERT
    # query's expansion tokens): they are computed though not attended to.
    unattended: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.input_ids.shape[0]), int(self.input_ids.shape[1]))


@dataclass(slots=True)
class ForwardOutput:
    """What one forward pass gives, float32 on the host, one row per input of the batch.

    `pooled` [batch, dimension]: the pooled vector (task embed, not normalized), the
    vocabulary-wide weights (task sparse: dimension = vocabulary), or the logits (task
    rerank: dimension = labels, 1). `token_weights` [batch, seq]: one weight per position
    of the batch (0 at padding), from a backend that declares `token_weights` (BGE-M3's
    lexical weights); per-token outputs such as token vectors join here as fields."""

    pooled: np.ndarray
    token_weights: np.ndarray | None = None
    # [batch, seq - token_vectors_from, d]: one vector per position from the backend's
    # `token_vectors_from` on (BGE-M3: colbert_linear on the states after the first
    # position; a ColBERT model: its projection of every position), not normalized, when
    # the batch asks for them.
    token_vectors: np.ndarray | None = None
    # [batch, seq, hidden]: the encoder's last hidden state at every position (0 at
    # padding), when the batch asks for them (TEI's /embed_all).
    token_states: np.ndarray | None = None


class BackendOutOfMemory(Exception):
    """The device ran out of memory for this batch; the engine splits it and retries."""


class Backend(Protocol):
    device: str
    dtype: str
    dimension: int
    # Declared capabilities (the engine reads these; it never probes for methods):
    # forward's output carries token_weights (BGE-M3's lexical weights);
    token_weights: bool
    # forward's output carries token_vectors when the batch asks (BGE-M3's ColBERT head,
    # a ColBERT model), from this position of the batch on;
    token_vectors: bool
    token_vectors_from: int
    # forward's output carries token_states when the batch asks, each `states_dimension`
    # wide (0 where it cannot: onnxruntime's graphs end in the pooled vector);
    states_dimension: int
    # cpu_threads(n) sets the intra-op threads of the calling thread for its next passes
    # (torch); False where they are fixed when the model loads (onnxruntime).
    per_pass_threads: bool

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        """One pass over `batch` (raises BackendOutOfMemory where the device ran out)."""
        ...

    def cpu_threads(self, n: int | None = None) -> int:
        """The forward pass's CPU threads: set to `n` first where per_pass_threads."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    """What a backend needs from a models.yaml entry to load it: where and how to run it,
    and how to find its files. No prompts, no Matryoshka: those are the engine's."""

    name: str
    hf_id: str
    revision: str
    backend: BackendName
    device: Device
    dtype: Dtype
    pooling: Pooling | None
    max_seq_length: int | None
    trust_remote_code: bool
    onnx_variant: OnnxVariant
    onnx_dir: str | None
    threads: int = 0  # CPU threads for a forward pass; 0: the library's default
    task: Task = "embed"
    lexical_weights: bool = False
    multivector: bool = False
    cuda_graphs: bool = False  # small passes on a CUDA device as CUDA graphs (cuda_graphs.py)
    code_revision: str | None = None  # the commit of the remote code, when pinned
    judge: JudgePrompt | None = None  # an LLM reranker's yes and no (backends/judge.py)

    def remote_code(self) -> dict[str, Any]:
        """from_pretrained's arguments for remote code: allowed (or not), at which commit."""
        kw: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.trust_remote_code and self.code_revision:
            kw["code_revision"] = self.code_revision
        return kw

    @classmethod
    def of(cls, spec: ModelSpec, threads: int = 0, cuda_graphs: bool = False) -> BackendSpec:
        """The entry's fields a backend needs (every field of both), and the server's."""
        own = {f.name for f in dataclasses.fields(cls)} - {"threads", "cuda_graphs"}
        kw = {name: getattr(spec, name) for name in own}
        return cls(**kw, threads=threads, cuda_graphs=cuda_graphs)


@dataclass(frozen=True)
class ColbertFormat:
    """How a ColBERT model (task multivector) turns a text into token vectors, as its folder
    says (PyLate's saved format as sentence-transformers' MultiVectorEncoder reads it): the
    marker put before a query or a document, each side's length, query expansion and the
    skiplist. The front end applies the markers, lengths and expansion (engine/prepare.py);
    the engine core the attention over expansion positions (batcher.pad) and the skiplist
    (postprocess.TokenRule)."""

    query_prefix: str
    document_prefix: str
    query_length: int  # the most tokens of a query, markers and special tokens included
    document_length: int  # the same for a document
    # Query expansion: a query of fewer tokens is filled with `expansion_id` up to
    # `expansion` positions (0: no expansion); the model attends to them only where
    # `attend_expansion`, and every one gets a vector.
    expansion: int = 0
    expansion_id: int = 0
    attend_expansion: bool = False
    # Tokens that get no vector (PyLate: punctuation), on the sides named.
    skip_ids: tuple[int, ...] = ()
    skip_query: bool = False
    skip_document: bool = True
    normalize: bool = True  # the model ends in a token-level Normalize

    def length(self, query: bool) -> int:
        return self.query_length if query else self.document_length


@dataclass
class LoadedModel:
    """What the engine needs from a loaded model: the backend plus its tokenizer facts."""

    path: Path
    backend: Backend
    tokenizer: Tokenizer  # bare fast tokenizer: no padding, no truncation configured
    max_seq_length: int
    pad_token_id: int
    pooling: str
    # task rerank: what turns the model's logit into a score by default (sigmoid | identity)
    score_activation: str = ""
    labels: tuple[str, ...] = ()  # task classify: each score's label, in logit order
    colbert: ColbertFormat | None = None  # task multivector
    # The dtype that serves it and why (dtype auto: backends/precision.py), for the log
    # and /info.
    precision: str = ""
