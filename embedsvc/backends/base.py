"""The backend protocol and the loader that picks an implementation for a ModelSpec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from embedsvc.registry import ModelSpec


@dataclass
class PaddedBatch:
    """Right-padded token ids of one forward pass."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray  # int64 [batch, seq]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.input_ids.shape[0]), int(self.input_ids.shape[1]))


class BackendOutOfMemory(Exception):
    """The device ran out of memory for this batch; the engine splits it and retries."""


class Backend(Protocol):
    device: str
    dtype: str
    dimension: int

    def forward(self, batch: PaddedBatch) -> np.ndarray:
        """Pooled (not normalized) float32 vectors, shape [batch, dimension]."""
        ...


@dataclass
class LoadedModel:
    """What the engine needs from a loaded model: the backend plus its tokenizer facts."""

    spec: ModelSpec
    path: Path
    backend: Backend
    tokenizer: Tokenizer  # bare fast tokenizer: no padding, no truncation configured
    max_seq_length: int
    pad_token_id: int
    pooling: str


def load_model(spec: ModelSpec, path: Path) -> LoadedModel:
    if spec.backend == "torch":
        from embedsvc.backends.torch_backend import load_torch_model

        return load_torch_model(spec, path)
    if spec.backend == "onnx":
        from embedsvc.backends.onnx_backend import load_onnx_model

        return load_onnx_model(spec, path)
    raise ValueError(f"unknown backend {spec.backend}")
