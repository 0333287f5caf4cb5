"""Cross-encoders (task: rerank): a sequence-classification model with one label that
scores a (query, document) pair, as sentence-transformers' `CrossEncoder` loads it; and
sequence classifiers (task: classify), the same model class with a score per label.

The engine sends pairs as one id sequence each (`[CLS] query [SEP] document [SEP]`, or
XLM-R's `<s> q </s></s> d </s>`), like any other input. For a model with segment embeddings
(BERT), the segment ids are rebuilt here from the separator: 0 up to and including the first
separator, 1 after it — what the tokenizer gives for a pair. The backend returns the logit;
the API applies the model's activation (sigmoid unless its configuration says otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from embedsvc.backends.base import BackendSpec, ForwardOutput, LoadedModel, PaddedBatch
from embedsvc.backends.bert import read_json
from embedsvc.backends.torch_common import (
    TorchThreads,
    guarded,
    load_transformers_model,
    log_loaded,
    pad_token_id_of,
)
from embedsvc.errors import ConfigError

ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}


class CrossEncoderBackend(TorchThreads):
    def __init__(self, model: Any, device: str, dtype: str, sep_id: int | None) -> None:
        self._model = model
        self.device = device
        self.dtype = dtype
        self.dimension = 1  # the number of labels
        self._sep_id = sep_id  # None: the model has no segment embeddings

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        import torch

        ids = torch.from_numpy(batch.input_ids).to(self.device)
        mask = torch.from_numpy(batch.attention_mask).to(self.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._sep_id is not None:
            sep = (ids == self._sep_id).long()
            kwargs["token_type_ids"] = ((torch.cumsum(sep, dim=1) - sep) > 0).long()
        logits = guarded(
            self.device, lambda: self._model(**kwargs).logits.to(torch.float32).cpu().numpy()
        )
        return ForwardOutput(logits)


def _read(path: Path) -> dict[str, Any]:
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def activation_of(config: dict[str, Any]) -> str:
    """The score activation sentence-transformers' CrossEncoder would apply by default."""
    st = config.get("sentence_transformers")
    path = (st or {}).get("activation_fn") if isinstance(st, dict) else None
    path = path or config.get("sbert_ce_default_activation_function")
    if not path:
        return "sigmoid"  # CrossEncoder's default for one label
    name = str(path).rsplit(".", 1)[-1]
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation {path} is not supported (Sigmoid or Identity)")
    return ACTIVATIONS[name]


def load_cross_encoder(spec: BackendSpec, path: Path) -> LoadedModel:
    model, backend, tokenizer, config, max_len = _sequence_classifier(spec, path)
    if model.config.num_labels != 1:
        raise ConfigError(
            f"model {spec.name}: a reranker scores with one label; {path} has "
            f"{model.config.num_labels} (a classifier is task classify)"
        )
    try:
        activation = activation_of(config)
    except ConfigError as e:
        raise ConfigError(f"model {spec.name}: {e}") from None
    what = f"reranker, score {activation}, max_seq_length={max_len}"
    log_loaded(spec, path, backend.device, backend.dtype, what)
    return _loaded(path, backend, tokenizer, config, max_len, activation)


def load_classifier(spec: BackendSpec, path: Path) -> LoadedModel:
    """A sequence classifier (task classify): per input a score per label, through the
    function transformers' text-classification pipeline applies by default (sigmoid for
    one label or a multi-label model, else softmax)."""
    model, backend, tokenizer, config, max_len = _sequence_classifier(spec, path)
    n = int(model.config.num_labels)
    id2label = getattr(model.config, "id2label", None) or {}
    labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n))
    multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
    activation = "sigmoid" if n == 1 or multi else "softmax"
    what = f"classifier, {n} labels, score {activation}, max_seq_length={max_len}"
    log_loaded(spec, path, backend.device, backend.dtype, what)
    return _loaded(path, backend, tokenizer, config, max_len, activation, labels)


def _sequence_classifier(
    spec: BackendSpec, path: Path
) -> tuple[Any, CrossEncoderBackend, Tokenizer, dict[str, Any], int]:
    """A transformers sequence classifier as a backend (its logits per input), its
    tokenizer, its config.json, and the length it takes."""
    from transformers import AutoModelForSequenceClassification

    if spec.backend != "torch":
        raise ConfigError(f"model {spec.name}: task {spec.task} runs on the torch backend")
    model, device, dtype, tokenizer = load_transformers_model(
        spec, path, AutoModelForSequenceClassification
    )
    config = _read(path / "config.json")
    tok_config = _read(path / "tokenizer_config.json")
    sep_id = None
    if int(getattr(model.config, "type_vocab_size", 1) or 1) > 1:
        sep = tok_config.get("sep_token", "[SEP]")
        sep = sep.get("content") if isinstance(sep, dict) else sep
        sep_id = tokenizer.token_to_id(str(sep))
        if sep_id is None:
            raise ConfigError(f"model {spec.name}: cannot find its separator token {sep!r}")
    limits = [spec.max_seq_length]
    model_max = tok_config.get("model_max_length")
    if isinstance(model_max, int) and model_max < 100_000:
        limits.append(model_max)
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if positions:  # RoBERTa family: positions start after the padding index
        offset = (
            int(model.config.pad_token_id or 0) + 1 if config.get("model_type") != "bert" else 0
        )
        limits.append(positions - offset)
    max_len = min(v for v in limits if v)
    backend = CrossEncoderBackend(model, device, dtype, sep_id)
    backend.dimension = int(model.config.num_labels)
    return model, backend, tokenizer, config, max_len


def _loaded(
    path: Path,
    backend: CrossEncoderBackend,
    tokenizer: Tokenizer,
    config: dict[str, Any],
    max_len: int,
    activation: str,
    labels: tuple[str, ...] = (),
) -> LoadedModel:
    return LoadedModel(
        path=path,
        backend=backend,
        tokenizer=tokenizer,
        max_seq_length=max_len,
        pad_token_id=pad_token_id_of(path, tokenizer, config) or 0,
        pooling="classifier",
        score_activation=activation,
        labels=labels,
    )
