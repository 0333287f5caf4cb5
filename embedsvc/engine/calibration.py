"""Calibration of int8/uint8 output: fixed texts, embedded once at warm-up.

int8 and uint8 vectors (sentence-transformers' `quantize_embeddings` scheme) map each
dimension's range onto 256 steps. The ranges come from these texts, embedded by the model
when it loads — the same texts for every replica and every restart — so integer vectors from
different requests, processes and days are comparable. There is one set of ranges per size
the model serves (its full size and each Matryoshka size), since truncation and
renormalization change the values. Values outside a range are clipped to its ends.
"""

from __future__ import annotations

import numpy as np

from embedsvc.backends.fixed_texts import TEXTS
from embedsvc.engine.postprocess import finalize

__all__ = ["TEXTS", "Ranges", "ranges"]


# Per served size: each dimension's (min, max).
Ranges = dict[int, tuple[list[float], list[float]]]


def ranges(pooled: np.ndarray, sizes: list[int], layer_norm: bool) -> Ranges:
    """Per served size: each dimension's (min, max) over the calibration vectors, as the
    engine finalizes them (normalized; Nomic's layer norm before truncation)."""
    full = pooled.shape[1]
    out = {}
    for size in sizes:
        dims = size if size < full else None
        v = finalize(
            pooled,
            dimensions=dims,
            normalize=True,
            layer_norm_first=layer_norm and dims is not None,
        )
        out[size] = (v.min(axis=0).tolist(), v.max(axis=0).tolist())
    return out
