"""The engine's contract with the API and between processes: plain, picklable data.

`EmbedRequest` is what the API hands over (already parsed, dialect-free), `EmbedResult`
what it gets back. `ModelInfo` is what a front end needs to know about a served model
(it may live in another process than the model). `CoreJob`, `JobDone` and `JobFailed`
travel between the front end and the engine core, in batches.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from embedsvc.backends.base import ColbertFormat
from embedsvc.engine.sparse import SparseRow
from embedsvc.errors import ErrorKind
from embedsvc.registry import ModelSpec

# The outputs a client names (/encode's `outputs`, `embedsvc embed --outputs`).
Output = Literal["dense", "sparse", "multivector"]


class Want(enum.IntFlag):
    """What a request asks of each input, from one forward pass: one output or several.
    The engine core carries it unchanged from the front end's CoreJob to the rows it
    finishes (engine/postprocess.py: one finisher per output) and the JobDone it sends
    back; a forward pass computes the union of what its jobs ask (batcher.pad)."""

    DENSE = enum.auto()  # the pooled vector (a reranker: its logit, as a 1-wide vector)
    SPARSE = enum.auto()  # non-zero weights: a SPLADE model's, BGE-M3's lexical weights
    TOKEN_VECTORS = enum.auto()  # a vector per token: a ColBERT model, BGE-M3's ColBERT head
    TOKEN_STATES = enum.auto()  # each token's state, not pooled (/embed_all)


PER_TOKEN = Want.TOKEN_VECTORS | Want.TOKEN_STATES
# Each named output and what it asks.
OUTPUT_WANTS: dict[str, Want] = {
    "dense": Want.DENSE,
    "sparse": Want.SPARSE,
    "multivector": Want.TOKEN_VECTORS,
}


def want_of(outputs: tuple[str, ...] | list[str]) -> Want:
    """What the named outputs ask (none: Want(0))."""
    want = Want(0)
    for name in outputs:
        want |= OUTPUT_WANTS[name]
    return want


# `prompt_name` NO_PROMPT: no prompt, not even the model's default; None: the default.
NO_PROMPT = ""


@dataclass(slots=True, frozen=True)
class Texts:
    """Texts to embed (a prompt may be put before each)."""

    texts: list[str]


@dataclass(slots=True, frozen=True)
class TokenIds:
    """Token-id sequences, embedded as given (special tokens included)."""

    ids: list[list[int]]


@dataclass(slots=True, frozen=True)
class Pairs:
    """One query and the documents to score against it (task rerank)."""

    query: str
    documents: list[str]


@dataclass(slots=True, frozen=True)
class Sequences:
    """Texts and text pairs to classify (task classify): each a string or a (first,
    second) pair, tokenized as the model's tokenizer takes one or two sequences."""

    items: list[str | tuple[str, str]]


# What a request holds: exactly one of these kinds.
Inputs = Texts | TokenIds | Pairs | Sequences


@dataclass(slots=True)
class EmbedRequest:
    inputs: Inputs
    # What the route asks of each input, carried unchanged to the result (the engine core
    # finishes each output: engine/postprocess.py). Pairs (rerank) ask DENSE: a logit.
    want: Want = Want.DENSE
    prompt_name: str | None = None
    # A task instruction, put before each text through the model's instruction_template
    # (in place of a prompt).
    instruction: str | None = None
    # In-context examples (instruct, query, response) in place of the model's (icl models).
    examples: tuple[tuple[str, str, str], ...] | None = None
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: str = "right"
    # Tokens each text may have (prompt and special tokens included) below the model's
    # limit: Cohere's max_tokens. Cut or refused by `truncate` as at the model's limit.
    max_tokens: int | None = None
    dimensions: int | None = None
    input_param: str = "inputs"
    request_id: str = ""
    timeout: float | None = None  # seconds the client will wait (x-request-timeout)
    # Characters the tokenizer is handed, each text with its prompt, instruction or
    # examples (set when the request is validated, before any tokenizing).
    chars: int = 0
    truncated: int = 0  # inputs cut to the model's limit (set when tokenized)

    @property
    def size(self) -> int:
        inputs = self.inputs
        if isinstance(inputs, Texts):
            return len(inputs.texts)
        if isinstance(inputs, Sequences):
            return len(inputs.items)
        return len(inputs.ids) if isinstance(inputs, TokenIds) else len(inputs.documents)


@dataclass(slots=True)
class EmbedResult:
    """The rows of a request, in input order, for each output it wanted: `vectors`
    (DENSE; a reranker's logits: read them as `scores`; [n, 0] when not wanted),
    `sparse` (SPARSE), `tokens` (TOKEN_VECTORS or TOKEN_STATES)."""

    vectors: np.ndarray  # float32 [n, d]
    prompt_tokens: int
    tokenization_time: float
    queue_time: float
    inference_time: float
    total_time: float
    input_tokens: list[int] = field(default_factory=list)  # per input, as embedded
    sparse: list[SparseRow] | None = None  # SPARSE: each input's non-zero entries
    # TOKEN_VECTORS: each input's token vectors, float32 [tokens, d], normalized;
    # TOKEN_STATES: its token states [tokens, hidden], as computed
    tokens: list[np.ndarray] | None = None
    truncated: int = 0  # inputs cut to the model's limit (EmbedRequest.truncated)

    @property
    def scores(self) -> np.ndarray:
        """Task rerank: the model's logit for each pair, float64 [n]."""
        return self.vectors[:, 0].astype(np.float64)


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model as the front end sees it: its entry, what loading found out, and the
    tokenizer (as JSON) so a front end in another process tokenizes exactly alike."""

    spec: ModelSpec
    path: str
    device: str
    dtype: str
    pooling: str
    dimension: int
    max_seq_length: int
    pad_token_id: int
    max_batch_tokens: int
    tokenizer_json: str
    default_prompt_name: str | None = None
    tokens_per_second: float = 0.0  # the admission estimate's rate when loaded (0: unknown)
    # int8/uint8 output: per served size, each dimension's (min, max) over the calibration
    # texts (engine/calibration.py), measured at warm-up.
    calibration: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)
    score_activation: str = ""  # task rerank: sigmoid | identity; classify: softmax too
    labels: tuple[str, ...] = ()  # task classify: each score's label, in logit order
    files_verified: bool = False  # every file's sha256 as the models lock records it
    colbert: ColbertFormat | None = None  # task multivector: markers, lengths, expansion
    states_dimension: int = 0  # the token states' width (/embed_all); 0: the backend has none
    precision: str = ""  # the dtype that serves it and why (backends/precision.py)

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def name(self) -> str:
        return self.spec.name

    def allowed_dimensions(self) -> list[int]:
        return sorted({self.dimension, *self.spec.matryoshka_dims}, reverse=True)


@dataclass(slots=True)
class CoreJob:
    """One request's inputs, tokenized, as the engine core queues them."""

    key: int  # unique within the front end that sent it
    ids: list[list[int]]
    tokens: int  # real tokens in `ids`, counted once by the front end
    dimensions: int | None
    normalize: bool
    layer_norm: bool
    max_wait: float = 0.0  # seconds it may wait for its vectors; 0: no limit
    want: Want = Want.DENSE  # the outputs asked of each input
    # ColBERT queries: positions the model attends to per input (the rest of its ids are
    # expansion tokens); None: all.
    attended: list[int] | None = None
    skip_tokens: bool = False  # the model's skiplist tokens get no vector (ColBERT documents)


@dataclass(slots=True)
class JobDone:
    key: int
    vectors: np.ndarray  # float32 [n, d], finalized ([n, 0] where DENSE was not asked)
    queue_time: float
    inference_time: float
    sparse: list[SparseRow] | None = None  # SPARSE: each input's rows
    tokens: list[np.ndarray] | None = None  # TOKEN_VECTORS or TOKEN_STATES: each input's


@dataclass(slots=True)
class JobFailed:
    key: int
    kind: ErrorKind
    message: str
    param: str | None = field(default=None)
    retry_after: int | None = field(default=None)
