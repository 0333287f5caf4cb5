"""Batching, prompts, truncation, Matryoshka and normalization. No HTTP here."""

from embedsvc.engine.engine import EmbedRequest, EmbedResult, ModelEngine
from embedsvc.engine.models import EngineSet, load_engines

__all__ = ["EmbedRequest", "EmbedResult", "EngineSet", "ModelEngine", "load_engines"]
