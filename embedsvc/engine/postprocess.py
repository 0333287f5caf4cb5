"""Post-processing of a forward pass's rows, pure numpy: Nomic layer norm, Matryoshka
truncation, L2 norm; sparse rows (engine/sparse.py) for the jobs that ask for them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedsvc.backends.base import ForwardOutput
from embedsvc.engine.batcher import Item
from embedsvc.engine.sparse import SparseRow, from_dense, from_token_weights
from embedsvc.engine.types import Want

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


@dataclass(frozen=True)
class TokenRule:
    """Which token vectors of a pass are an input's answer: BGE-M3's head gives none for
    the first position (`first` 1: the backend's token_vectors_from); a ColBERT model one
    per position, less its skiplist tokens on the side that has one (PyLate: a document's
    punctuation), normalized where the model ends in a Normalize."""

    first: int = 1
    skip_ids: frozenset[int] = frozenset()
    normalize: bool = True

    def rows(self, vectors: np.ndarray, ids: list[int], skip: bool) -> np.ndarray:
        """One input's vectors from its row of the pass's token_vectors."""
        out = vectors[: len(ids) - self.first]
        if skip and self.skip_ids:
            kept = [i not in self.skip_ids for i in ids[self.first :]]
            out = out[np.fromiter(kept, dtype=bool, count=len(kept))]
        if self.normalize:
            return l2_normalize(out)
        return np.ascontiguousarray(out, dtype=np.float32)


BGE_M3_TOKENS = TokenRule()


@dataclass(slots=True)
class Outputs:
    """A row of a job that asks for several outputs of one pass (/encode)."""

    dense: np.ndarray | None
    sparse: SparseRow | None
    tokens: np.ndarray | None


Row = np.ndarray | SparseRow | Outputs


def finalize_rows(
    items: list[Item],
    output: ForwardOutput,
    sparse_task: bool,
    special_ids: Callable[[], frozenset[int]],
    token_rule: TokenRule = BGE_M3_TOKENS,
) -> list[Row] | np.ndarray:
    """Rows in the order of `items`, each finished as its job's `want` asks (FINISHERS:
    one per output). Sparse outputs leave here as their non-zero entries: a SPLADE
    model's vocabulary-wide rows (`sparse_task`), or the token weights of BGE-M3's
    lexical head (special tokens, from `special_ids()`, have none). A job that asks for
    more than one output gets an `Outputs` row."""
    pooled = output.pooled
    if sparse_task:
        return [from_dense(row) for row in pooled]
    keys = [(it.job.dimensions, it.job.normalize, it.job.layer_norm) for it in items]
    first = keys[0]
    wants = [it.job.want for it in items]
    if all(w is Want.DENSE for w in wants) and all(k == first for k in keys):
        dims, normalize, ln = first
        return finalize(pooled, dimensions=dims, normalize=normalize, layer_norm_first=ln)
    groups: dict[tuple[int | None, bool, bool], list[int]] = defaultdict(list)
    out: list[Row] = [pooled[0]] * len(items)
    finished = _Pass(output, special_ids, token_rule)
    for row, want in enumerate(wants):
        if want is Want.DENSE:  # finished together, per (dimensions, normalize, layer norm)
            groups[keys[row]].append(row)
            continue
        parts = {w: FINISHERS[w](finished, items[row], row) for w in want}
        if len(parts) == 1:
            out[row] = next(iter(parts.values()))
        else:
            tokens = parts.get(Want.TOKEN_VECTORS, parts.get(Want.TOKEN_STATES))
            out[row] = Outputs(parts.get(Want.DENSE), parts.get(Want.SPARSE), tokens)
    for (dims, normalize, ln), rows in groups.items():
        vecs = finalize(pooled[rows], dimensions=dims, normalize=normalize, layer_norm_first=ln)
        for k, row in enumerate(rows):
            out[row] = vecs[k]
    return out


@dataclass(slots=True)
class _Pass:
    """What the finishers read of one forward pass."""

    output: ForwardOutput
    special_ids: Callable[[], frozenset[int]]
    token_rule: TokenRule


def _dense(p: _Pass, item: Item, row: int) -> np.ndarray:
    job = item.job
    pooled = p.output.pooled[row : row + 1]
    return finalize(
        pooled, dimensions=job.dimensions, normalize=job.normalize, layer_norm_first=job.layer_norm
    )[0]


def _sparse(p: _Pass, item: Item, row: int) -> SparseRow:
    assert p.output.token_weights is not None  # the model's lexical head (registry)
    return from_token_weights(item.ids, p.output.token_weights[row], p.special_ids())


def _token_vectors(p: _Pass, item: Item, row: int) -> np.ndarray:
    assert p.output.token_vectors is not None  # the batch asked (batcher.pad)
    return p.token_rule.rows(p.output.token_vectors[row], item.ids, item.job.skip_tokens)


def _token_states(p: _Pass, item: Item, row: int) -> np.ndarray:
    assert p.output.token_states is not None  # the batch asked (batcher.pad)
    return np.array(p.output.token_states[row, : len(item.ids)], dtype=np.float32)


# Each output's finisher: (the pass, the item, its row in the pass) -> its row.
FINISHERS: dict[Want, Callable[[_Pass, Item, int], Any]] = {
    Want.DENSE: _dense,
    Want.SPARSE: _sparse,
    Want.TOKEN_VECTORS: _token_vectors,
    Want.TOKEN_STATES: _token_states,
}
