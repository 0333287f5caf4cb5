"""SPLADE sparse encoders (task: sparse), as sentence-transformers' `SparseEncoder` loads
them: a masked-language-model transformer, then SpladePooling — log(1 + relu(logit)) per
token and vocabulary entry (applied twice for `log1p_relu`), masked, and pooled over the
sequence by max or sum. The backend returns the dense vocabulary-sized vector; the API
sends its non-zero entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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


class SpladeBackend(TorchThreads):
    def __init__(self, model: Any, device: str, dtype: str, pooling: str, twice: bool) -> None:
        self._model = model
        self.device = device
        self.dtype = dtype
        self.dimension = int(model.config.vocab_size)
        self._pooling = pooling
        self._twice = twice

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        import torch

        ids = torch.from_numpy(batch.input_ids).to(self.device)
        mask = torch.from_numpy(batch.attention_mask).to(self.device)

        def run() -> np.ndarray:
            logits = self._model(input_ids=ids, attention_mask=mask).logits
            x = torch.log1p(torch.relu(logits * mask.unsqueeze(-1).to(logits.dtype)))
            if self._twice:
                x = torch.log1p(x)
            pooled = x.amax(dim=1) if self._pooling == "max" else x.sum(dim=1)
            return pooled.to(torch.float32).cpu().numpy()

        return ForwardOutput(guarded(self.device, run))


def load_splade(spec: BackendSpec, path: Path) -> LoadedModel:
    from transformers import AutoModelForMaskedLM

    modules = read_json(path / "modules.json")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules or []]
    sbert = read_json(path / "sentence_bert_config.json") or {}
    mlm = kinds[:1] == ["MLMTransformer"] or (
        kinds[:1] == ["Transformer"] and sbert.get("transformer_task") == "fill-mask"
    )
    if not mlm or kinds[1:] != ["SpladePooling"] or modules[0].get("path", "") != "":
        raise ConfigError(
            f"model {spec.name}: task sparse serves SPLADE models (a fill-mask transformer, "
            f"then SpladePooling); {path} has modules {kinds or 'none'}"
        )
    pooling_cfg = read_json(path / str(modules[1].get("path", "")) / "config.json") or {}
    pooling = pooling_cfg.get("pooling_strategy", "max")
    activation = pooling_cfg.get("activation_function", "relu")
    if pooling not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise ConfigError(f"model {spec.name}: SpladePooling {pooling_cfg} is not supported")
    model, device, dtype, tokenizer = load_transformers_model(spec, path, AutoModelForMaskedLM)
    limits = [spec.max_seq_length, sbert.get("max_seq_length")]
    model_max = (read_json(path / "tokenizer_config.json") or {}).get("model_max_length")
    if isinstance(model_max, int) and model_max < 100_000:
        limits.append(model_max)
    limits.append(int(getattr(model.config, "max_position_embeddings", 0) or 0))
    max_len = min(int(v) for v in limits if v)
    backend = SpladeBackend(model, device, dtype, pooling, activation == "log1p_relu")
    what = f"SPLADE, {pooling} pooling, {backend.dimension} dims, max_seq_length={max_len}"
    log_loaded(spec, path, device, dtype, what)
    config = read_json(path / "config.json") or {}
    return LoadedModel(
        path=path,
        backend=backend,
        tokenizer=tokenizer,
        max_seq_length=max_len,
        pad_token_id=pad_token_id_of(path, tokenizer, config) or 0,
        pooling=f"splade-{pooling}",
    )
