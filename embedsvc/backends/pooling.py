"""Pooling of token states into one vector per input, in numpy, for backends that return
token states (onnx). The torch backend uses sentence-transformers' own Pooling module."""

from __future__ import annotations

import numpy as np


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """hidden [batch, seq, dim] float, mask [batch, seq] 0/1 -> [batch, dim] float32."""
    if mode == "cls":
        return np.ascontiguousarray(hidden[:, 0, :], dtype=np.float32)
    if mode == "mean":
        m = mask[:, :, None].astype(np.float32)
        summed = (hidden.astype(np.float32) * m).sum(axis=1)
        return summed / np.maximum(m.sum(axis=1), 1e-9)
    if mode == "lasttoken":
        last = mask.sum(axis=1).astype(np.int64) - 1  # right padding
        return np.ascontiguousarray(hidden[np.arange(hidden.shape[0]), last], dtype=np.float32)
    raise ValueError(f"unknown pooling {mode!r}")
