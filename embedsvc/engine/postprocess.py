"""Vector post-processing, pure numpy: Nomic layer norm, Matryoshka truncation, L2 norm."""

from __future__ import annotations

import numpy as np

LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default, as the Nomic card uses
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default


def layer_norm(x: np.ndarray, eps: float = LAYER_NORM_EPS) -> np.ndarray:
    """Layer norm over the last axis without affine weights."""
    x64 = x.astype(np.float64, copy=False)
    mean = x64.mean(axis=-1, keepdims=True)
    var = x64.var(axis=-1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps)).astype(np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, NORM_EPS)).astype(np.float32, copy=False)


def finalize(
    pooled: np.ndarray, *, dimensions: int | None, normalize: bool, layer_norm_first: bool
) -> np.ndarray:
    """pool -> (layer norm, Matryoshka models that need it) -> truncate -> L2-normalize."""
    x = pooled.astype(np.float32, copy=False)
    if layer_norm_first:
        x = layer_norm(x)
    if dimensions is not None and dimensions < x.shape[-1]:
        x = x[:, :dimensions]
    if normalize:
        x = l2_normalize(x)
    return np.ascontiguousarray(x, dtype=np.float32)
