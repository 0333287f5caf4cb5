"""Sparse outputs kept sparse from the forward pass on: per input, the indices and weights
of its non-zero entries, never a vocabulary-wide (SPLADE) or sequence-wide (BGE-M3 lexical
weights) dense row through the queue, the results or the process boundary."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

# (indices, ascending int32; weights, float32 > 0): one input's non-zero entries
SparseRow = tuple[np.ndarray, np.ndarray]


def from_dense(row: np.ndarray) -> SparseRow:
    """A SPLADE row (one weight per vocabulary entry): its non-zero entries, copied out
    of the batch (a view would keep the whole dense batch alive)."""
    nz = np.flatnonzero(row)
    return nz.astype(np.int32), row[nz].astype(np.float32)


def from_token_weights(
    ids: Sequence[int], weights: np.ndarray, special: Collection[int]
) -> SparseRow:
    """BGE-M3's lexical weights (one weight per position of the input): each token id's
    largest weight over its occurrences, special tokens and weights <= 0 left out."""
    tokens = np.asarray(ids, dtype=np.int32)
    w = np.asarray(weights[: len(tokens)], dtype=np.float32)
    keep = w > 0
    if special:
        keep &= ~np.isin(tokens, np.fromiter(special, dtype=np.int32, count=len(special)))
    tokens, w = tokens[keep], w[keep]
    if not len(tokens):
        return tokens, w
    order = np.argsort(tokens, kind="stable")
    tokens, w = tokens[order], w[order]
    starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
    return tokens[starts], np.maximum.reduceat(w, starts)
