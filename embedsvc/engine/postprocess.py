"""Post-processing of a forward pass's rows, pure numpy: Nomic layer norm, Matryoshka
truncation, L2 norm; sparse rows (engine/sparse.py) for the jobs that ask for them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embedsvc.backends.base import ForwardOutput
from embedsvc.engine.batcher import Item
from embedsvc.engine.sparse import SparseRow, from_dense, from_token_weights

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
    """Rows in the order of `items`, each finalized as its job asks. Sparse outputs
    leave here as their non-zero entries: a SPLADE model's vocabulary-wide rows
    (`sparse_task`), and the token weights a lexical-weight job asks for (BGE-M3; special
    tokens, from `special_ids()`, have none). A job that asks for more than one output
    (`dense_too`, or lexical weights and token vectors) gets an `Outputs` row."""
    pooled = output.pooled
    if sparse_task:
        return [from_dense(row) for row in pooled]
    keys = [(it.job.dimensions, it.job.normalize, it.job.layer_norm) for it in items]
    first = keys[0]
    lexical = [it.job.lexical for it in items]
    # No token vectors or states computed (no job of the pass asked: batcher.pad) and no
    # lexical job: every row is a vector (a job that asks several outputs asks one of those).
    no_tokens = output.token_vectors is None and output.token_states is None
    if no_tokens and not any(lexical) and all(k == first for k in keys):
        dims, normalize, ln = first
        return finalize(pooled, dimensions=dims, normalize=normalize, layer_norm_first=ln)
    tokens = [getattr(it.job, "multivector", False) for it in items]
    groups: dict[tuple[int | None, bool, bool], list[int]] = defaultdict(list)
    out: list[Row] = [pooled[0]] * len(items)
    for row, key in enumerate(keys):
        job = items[row].job
        if getattr(job, "dense_too", False) or (lexical[row] and tokens[row]):
            out[row] = _outputs(items[row], row, output, key, special_ids, token_rule)
        elif tokens[row] and job.states:
            assert output.token_states is not None  # the batch asked (batcher.pad)
            n = len(items[row].ids)
            out[row] = np.array(output.token_states[row, :n], dtype=np.float32)
        elif tokens[row]:
            assert output.token_vectors is not None  # the batch asked (batcher.pad)
            vectors = output.token_vectors[row]
            out[row] = token_rule.rows(vectors, items[row].ids, job.skip_tokens)
        elif lexical[row]:
            assert output.token_weights is not None  # the model's lexical head (registry)
            weights = output.token_weights[row]
            out[row] = from_token_weights(items[row].ids, weights, special_ids())
        else:
            groups[key].append(row)
    for (dims, normalize, ln), rows in groups.items():
        vecs = finalize(pooled[rows], dimensions=dims, normalize=normalize, layer_norm_first=ln)
        for k, row in enumerate(rows):
            out[row] = vecs[k]
    return out


def _outputs(
    item: Item,
    row: int,
    output: ForwardOutput,
    key: tuple[int | None, bool, bool],
    special_ids: Callable[[], frozenset[int]],
    token_rule: TokenRule,
) -> Outputs:
    job = item.job
    dense = sparse = tokens = None
    if job.dense_too:
        dims, normalize, ln = key
        dense = finalize(
            output.pooled[row : row + 1], dimensions=dims, normalize=normalize, layer_norm_first=ln
        )[0]
    if job.lexical:
        assert output.token_weights is not None
        sparse = from_token_weights(item.ids, output.token_weights[row], special_ids())
    if job.multivector:
        assert output.token_vectors is not None
        tokens = token_rule.rows(output.token_vectors[row], item.ids, job.skip_tokens)
    return Outputs(dense, sparse, tokens)
