"""Backends run a forward pass on an already tokenized, padded batch.

They return pooled float32 vectors and never see HTTP, prompts or Matryoshka.
"""

from embedsvc.backends.base import Backend, BackendOutOfMemory, LoadedModel, PaddedBatch
from embedsvc.backends.loaders import load_model

__all__ = ["Backend", "BackendOutOfMemory", "LoadedModel", "PaddedBatch", "load_model"]
