"""torch backend: a BERT-family encoder and pooling in plain torch (backends/bert.py)
when the model folder is one, else sentence-transformers' modules minus the final Normalize.

The engine owns normalization (and Nomic's layer norm, and Matryoshka truncation), so
this backend stops at pooling (plus any Dense projection the model declares).

Somewhat over 400 lines: the three ways a folder loads (the own encoder, the
sentence-transformers modules, remote code at a pinned commit) and the trace kept only if
it matches the eager module are one decision, tried in order, and read best together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from embedsvc.backends import bert
from embedsvc.backends.base import (
    BackendOutOfMemory,
    BackendSpec,
    ForwardOutput,
    LoadedModel,
    PaddedBatch,
)
from embedsvc.backends.cuda_graphs import BucketGraphs
from embedsvc.backends.torch_common import (
    TorchThreads,
    guarded,
    load_sentence_transformers,
    load_transformers_model,
    log_loaded,
    pad_token_id_of,
    place,
    trace_states,
)
from embedsvc.errors import ConfigError

log = logging.getLogger(__name__)


class TorchBackend(TorchThreads):
    """`encoder` maps (input_ids, attention_mask) to token states; `head` (callables on
    sentence-transformers' feature dicts) pools them. With no encoder, `head` is the whole
    model, run from the ids. With `pooled`, `encoder` is the whole model: it returns the
    float32 sentence vectors. `graphs` (CUDA) runs the passes it has a graph for."""

    def __init__(
        self,
        encoder: Any,
        head: list[Any],
        device: str,
        dtype: str,
        dimension: int,
        lexical: Any = None,
        pooled: bool = False,
        colbert: Any = None,
        states: tuple[Any, list[Any]] | None = None,
        states_dimension: int = 0,
    ) -> None:
        self._encoder = encoder
        self._head = head
        self._pooled = pooled
        # With `pooled`, the untraced encoder and the pooling head, for the passes that
        # also return the token states (/embed_all).
        self._states = states
        self.states_dimension = states_dimension if (states or not pooled) else 0
        self.device = device
        self.dtype = dtype
        self.dimension = dimension
        # BGE-M3's lexical weights: relu(Linear(hidden -> 1)) per token, returned after the
        # vector as one more column per position of the batch (`token_weights`).
        self._lexical = lexical
        self.token_weights = lexical is not None
        # BGE-M3's ColBERT vectors: Linear(hidden -> d) on the states after the first
        # position, padding zeroed, when a batch asks for them (`token_vectors`).
        self._colbert = colbert
        self.token_vectors = colbert is not None
        self.graphs: BucketGraphs | None = None

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        import torch

        graphs = self.graphs
        if graphs is not None and not batch.token_states:
            vectors = guarded(self.device, lambda: graphs.forward(batch))
            if vectors is not None:
                return ForwardOutput(vectors)
        encoder, head, pooled = self._encoder, self._head, self._pooled
        if pooled and batch.token_states and self._states is not None:
            (encoder, head), pooled = self._states, False
        if pooled and self.device == "cpu":
            # One call into the traced model and nothing else that enters torch's
            # dispatcher: each torch call from Python lets go of the GIL, and taking it
            # back means waiting for the busy event loop thread to let go in turn. Under
            # load (a near-free model, 64 connections) this took 7% less CPU per request
            # than pooling in Python after the traced encoder; MiniLM gained 3%.
            ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
            with torch.inference_mode():  # called from the compute thread only
                return ForwardOutput(encoder(ids, mask).numpy())
        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(batch.input_ids).to(self.device, non_blocking=True),
            "attention_mask": torch.from_numpy(batch.attention_mask).to(
                self.device, non_blocking=True
            ),
        }
        try:
            with torch.inference_mode():  # called from the compute thread only
                if pooled:
                    ids, mask = features["input_ids"], features["attention_mask"]
                    features["sentence_embedding"] = encoder(ids, mask)
                elif encoder is not None:
                    ids, mask = features["input_ids"], features["attention_mask"]
                    features["token_embeddings"] = encoder(ids, mask)
                states = features.get("token_embeddings")
                for module in head:
                    features = module(features)
                if states is None:  # the modules ran the transformer too
                    states = features.get("token_embeddings")
                out = features["sentence_embedding"].to(torch.float32).cpu().numpy()
                colbert = self._colbert if batch.token_vectors else None
                if self._lexical is None and colbert is None and not batch.token_states:
                    return ForwardOutput(out)
                mask = features["attention_mask"].to(torch.float32)
                assert states is not None  # the heads' models load with their states
                output = ForwardOutput(out)
                if batch.token_states:
                    kept = states * mask[:, :, None].to(states.dtype)
                    output.token_states = kept.to(torch.float32).cpu().numpy()
                if self._lexical is not None:
                    lexical = self._lexical(states.to(self._lexical.weight.dtype))
                    weights = torch.relu(lexical).squeeze(-1).to(torch.float32)
                    output.token_weights = (weights * mask).cpu().numpy()
                if colbert is not None:
                    heads = states[:, 1:].to(colbert.weight.dtype)
                    vectors = colbert(heads) * mask[:, 1:, None].to(heads.dtype)
                    output.token_vectors = vectors.to(torch.float32).cpu().numpy()
                return output
        except torch.OutOfMemoryError as e:
            del features
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            raise BackendOutOfMemory(str(e)) from e


def _hf_transformer(modules: Any) -> Any:
    """The Hugging Face model in the first (sentence-transformers Transformer) module as
    a module of (input_ids, attention_mask) -> token states, or None when that module
    does more than call it."""

    first = modules[0]
    text = getattr(first, "modality_config", {}).get("text", {})
    if (
        type(first).__name__ != "Transformer"
        or getattr(first, "module_output_name", None) != "token_embeddings"
        or text.get("method") != "forward"
        or text.get("method_output_name") not in ("last_hidden_state", ("last_hidden_state",))
        or getattr(first.model.config, "output_hidden_states", False)
    ):
        return None

    return _hidden(first.model)


def _hidden(model: Any) -> Any:
    """A transformers model as a module of (input_ids, attention_mask) -> token states."""
    import torch

    class Hidden(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, mask: Any) -> Any:
            return self.model(input_ids=ids, attention_mask=mask, return_dict=True)[
                "last_hidden_state"
            ]

    return Hidden(model).eval()


# sentence-transformers modules a remote-code model may list (anything else is refused).
_REMOTE_CODE_MODULES = ("Transformer", "Pooling", "Normalize")
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _load_remote_code(spec: BackendSpec, path: Path) -> _Parts:
    """A model whose code lives in another repository, loaded with transformers' AutoModel
    at the pinned `code_revision`, with the entry's pooling. (sentence-transformers drops
    `code_revision` from model_kwargs when it resolves its own module classes, so through
    it the code would come from the code repository's main branch.)"""
    from transformers import AutoModel

    modules = bert.read_json(path / "modules.json") or []
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    other = [k for k in kinds if k not in _REMOTE_CODE_MODULES]
    if other:
        raise ConfigError(
            f"model {spec.name}: remote code with sentence-transformers modules "
            f"{', '.join(other)} is not supported; only {', '.join(_REMOTE_CODE_MODULES)}"
        )
    pooling_dir = next((m.get("path") for m in modules if "Pooling" in str(m.get("type"))), None)
    pooling_cfg = bert.read_json(path / str(pooling_dir) / "config.json") if pooling_dir else None
    declared = [v for k, v in _POOLING_KEYS.items() if (pooling_cfg or {}).get(k)]
    pooling = spec.pooling or (declared[0] if declared else "")
    if pooling not in ("cls", "mean", "lasttoken"):
        raise ConfigError(f"model {spec.name}: set pooling in models.yaml (cls, mean, lasttoken)")
    model, device, _, tokenizer = load_transformers_model(spec, path, AutoModel)
    hidden = _hidden(model)

    def pool(features: dict[str, Any]) -> dict[str, Any]:
        states, mask = features["token_embeddings"], features["attention_mask"]
        features["sentence_embedding"] = bert.pool(states, mask, pooling)
        return features

    config = bert.read_json(path / "config.json") or {}
    sbert = bert.read_json(path / "sentence_bert_config.json") or {}
    return _Parts(
        encoder=trace_states(hidden, device) or hidden,
        head=[pool],
        pooling=pooling,
        dimension=int(model.config.hidden_size),
        tokenizer=tokenizer,
        pad_token_id=pad_token_id_of(path, tokenizer, config),
        max_seq_length=sbert.get("max_seq_length"),
        via=f"transformers, remote code at {(spec.code_revision or '')[:12]}",
    )


@dataclass
class _Parts:
    encoder: Any
    head: list[Any]
    pooling: str
    dimension: int
    tokenizer: Tokenizer
    pad_token_id: int | None
    max_seq_length: int | None
    via: str
    pooled: bool = False  # `encoder` returns sentence vectors (pooling included)
    eager: Any = None  # the untraced pooled module, for CUDA graphs
    # With `pooled`: the untraced encoder and its pooling head, for passes with states.
    states: tuple[Any, list[Any]] | None = None


def load_torch_model(spec: BackendSpec, path: Path) -> LoadedModel:
    device, dtype = place(spec, path)
    parts = None
    lean = None if spec.trust_remote_code else bert.plan(path)
    if lean is not None:
        try:
            states = spec.lexical_weights or spec.multivector
            parts = _load_lean(lean, path, device, dtype, states=states)
        except ValueError as e:  # weights named otherwise: the library knows more layouts
            log.info("model %s: %s; loading it with sentence-transformers", spec.name, e)
    if parts is None and spec.trust_remote_code and spec.code_revision:
        parts = _load_remote_code(spec, path)
    if parts is None:
        parts = _load_sentence_transformers(spec, path, device, dtype)
    if spec.pooling and parts.pooling != spec.pooling:
        raise ConfigError(
            f"model {spec.name}: models.yaml says pooling {spec.pooling!r} but the model folder "
            f"declares {parts.pooling!r}; fix the entry or the folder"
        )
    limits = [v for v in (spec.max_seq_length, parts.max_seq_length) if v]
    if not limits:
        raise ConfigError(f"model {spec.name}: set max_seq_length in models.yaml")
    max_len = int(min(limits))
    parts.tokenizer.no_padding()
    parts.tokenizer.no_truncation()
    lexical = colbert = None
    if (spec.lexical_weights or spec.multivector) and parts.encoder is None:
        raise ConfigError(f"model {spec.name}: lexical weights and token vectors need its states")
    # The own encoder's states are float32 on a CPU whatever its dtype (bert.build): its
    # heads, a small share of the work, stay float32 there too.
    heads = "float32" if device == "cpu" and parts.via == "torch" else dtype
    if spec.lexical_weights:
        lexical = load_head(spec, path, device, heads, "sparse_linear", "lexical_weights")
    if spec.multivector:
        colbert = load_head(spec, path, device, heads, "colbert_linear", "multivector")
    hidden = (bert.read_json(path / "config.json") or {}).get("hidden_size")
    backend = TorchBackend(
        parts.encoder,
        parts.head,
        device,
        dtype,
        parts.dimension,
        lexical,
        parts.pooled,
        colbert,
        parts.states,
        hidden if isinstance(hidden, int) else 0,
    )
    if spec.cuda_graphs and parts.eager is not None and device.startswith("cuda"):
        backend.graphs = BucketGraphs(parts.eager, device, parts.pad_token_id or 0, max_len)
    what = f"{parts.via}, dim={parts.dimension} pooling={parts.pooling} max_seq_length={max_len}"
    log_loaded(spec, path, device, dtype, what)
    return LoadedModel(
        path=path,
        backend=backend,
        tokenizer=parts.tokenizer,
        max_seq_length=max_len,
        pad_token_id=parts.pad_token_id or 0,
        pooling=parts.pooling,
    )


def _load_lean(p: bert.Plan, path: Path, device: str, dtype: str, states: bool) -> _Parts:
    """A BERT-family folder with torch alone (see backends/bert.py). Unless the token
    states are needed (`states`: lexical weights), encoder and pooling are traced as one
    module, so a pass is one call into TorchScript (see TorchBackend.forward)."""
    encoder = bert.build(p, device, dtype)
    mode = p.pooling

    def pool(features: dict[str, Any]) -> dict[str, Any]:
        states, mask = features["token_embeddings"], features["attention_mask"]
        features["sentence_embedding"] = bert.pool(states, mask, mode)
        return features

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    whole = None if states else bert.pooled(encoder, mode)
    return _Parts(
        encoder=trace_states(whole or encoder, device) or whole or encoder,
        head=[] if whole is not None else [pool],
        pooled=whole is not None,
        eager=whole,
        states=(encoder, [pool]) if whole is not None else None,
        pooling=mode,
        dimension=p.dimension,
        tokenizer=tokenizer,
        pad_token_id=pad_token_id_of(path, tokenizer, p.config),
        max_seq_length=p.max_seq_length,
        via="torch",
    )


def load_head(spec: BackendSpec, path: Path, device: str, dtype: str, name: str, key: str) -> Any:
    """One of BGE-M3's heads, a Linear on the token states: `sparse_linear` (hidden -> 1, the
    lexical weights) or `colbert_linear` (hidden -> d, the ColBERT vectors). From
    `{name}.safetensors` if the folder has one, else `{name}.pt` (as the repository ships
    it) read with `torch.load(weights_only=True)`, which loads tensors only and runs no
    pickled code."""
    import torch

    state: dict[str, Any]
    if (path / f"{name}.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / f"{name}.safetensors"))
    elif (path / f"{name}.pt").is_file():
        state = torch.load(str(path / f"{name}.pt"), map_location="cpu", weights_only=True)
    else:
        raise ConfigError(
            f"model {spec.name}: {key} needs {name}.pt or {name}.safetensors in {path} "
            "(embedsvc pull fetches it)"
        )
    weight = state.get("weight")
    if weight is None or weight.ndim != 2 or (name == "sparse_linear" and weight.shape[0] != 1):
        raise ConfigError(f"model {spec.name}: {name} is not a Linear of the token states")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(state)
    return head.to(device=device, dtype=getattr(torch, dtype)).eval()


def _foreign_modules(path: Path) -> list[str]:
    """The modules.json entries that are not sentence-transformers' own classes."""
    modules = bert.read_json(path / "modules.json") or []
    kinds = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    return [k for k in kinds if not k.startswith("sentence_transformers.")]


def _load_sentence_transformers(spec: BackendSpec, path: Path, device: str, dtype: str) -> _Parts:
    from sentence_transformers import SentenceTransformer

    foreign = _foreign_modules(path)
    if foreign:
        raise ConfigError(
            f"model {spec.name}: {path} declares module(s) {', '.join(foreign)} in modules.json, "
            "which a sentence-transformers embedding model cannot run as saved; embedsvc serves "
            "no model it cannot compute exactly. A PyLate ColBERT model (its own Dense "
            "projection, query/document markers) is served with task: multivector"
        )
    st = load_sentence_transformers(spec, path, SentenceTransformer, device, dtype)

    modules = [m for m in st if type(m).__name__ != "Normalize"]
    pooling_modules = [m for m in modules if type(m).__name__ == "Pooling"]
    if not pooling_modules:
        raise ConfigError(f"model {spec.name}: {path} declares no pooling module")
    pooling = str(getattr(pooling_modules[0], "pooling_mode", "unknown"))
    get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dimension = get_dim()
    if not dimension:
        raise ConfigError(f"model {spec.name}: cannot tell the embedding dimension")

    hf_tokenizer = st.tokenizer
    backend_tokenizer = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend_tokenizer is None:
        raise ConfigError(f"model {spec.name}: needs a fast tokenizer (tokenizer.json)")
    pad_id = hf_tokenizer.pad_token_id
    hidden = _hf_transformer(modules)
    traced = trace_states(hidden, device) if hidden is not None else None
    return _Parts(
        encoder=traced,
        head=modules[1:] if traced is not None else modules,
        pooling=pooling,
        dimension=int(dimension),
        tokenizer=Tokenizer.from_str(backend_tokenizer.to_str()),
        pad_token_id=int(pad_id) if pad_id is not None else None,
        max_seq_length=getattr(st, "max_seq_length", None),
        via="sentence-transformers",
    )
