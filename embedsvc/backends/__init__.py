"""Backends run a forward pass on an already tokenized, padded batch.

They return a `ForwardOutput` (pooled float32 rows, and per-token outputs where the model
has them) and never see HTTP, prompts or Matryoshka.
"""

from embedsvc.backends.base import (
    Backend,
    BackendOutOfMemory,
    ForwardOutput,
    LoadedModel,
    PaddedBatch,
)
from embedsvc.backends.loaders import load_model

__all__ = [
    "Backend",
    "BackendOutOfMemory",
    "ForwardOutput",
    "LoadedModel",
    "PaddedBatch",
    "load_model",
]
