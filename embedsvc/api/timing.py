"""Timing headers on every embedding response (milliseconds, as TEI sends them)."""

from __future__ import annotations

from embedsvc.engine import EmbedResult


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def timing_headers(r: EmbedResult) -> dict[str, str]:
    return {
        "x-total-time": _ms(r.total_time),
        "x-tokenization-time": _ms(r.tokenization_time),
        "x-queue-time": _ms(r.queue_time),
        "x-inference-time": _ms(r.inference_time),
        "x-compute-tokens": str(r.prompt_tokens),
    }
