"""Batching, prompts, truncation, Matryoshka and normalization. No HTTP here."""

from embedsvc.engine.engine import ModelEngine
from embedsvc.engine.models import EngineSet, load_engines
from embedsvc.engine.types import (
    NO_PROMPT,
    EmbedRequest,
    EmbedResult,
    Inputs,
    ModelInfo,
    Pairs,
    Sequences,
    Texts,
    TokenIds,
    Want,
    want_of,
)

__all__ = [
    "NO_PROMPT",
    "EmbedRequest",
    "EmbedResult",
    "EngineSet",
    "Inputs",
    "ModelEngine",
    "ModelInfo",
    "Pairs",
    "Sequences",
    "Texts",
    "TokenIds",
    "Want",
    "load_engines",
    "want_of",
]
