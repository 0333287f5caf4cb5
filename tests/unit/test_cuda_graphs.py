"""Bucketed passes for CUDA graphs (backends/cuda_graphs.py), on the CPU: the buckets, the
padding to them and the check a captured graph must pass run here without capture (CI has
no GPU; bench/gpu_check.py checks the captured graphs on one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embedsvc.backends import bert
from embedsvc.backends.base import PaddedBatch
from embedsvc.backends.cuda_graphs import BucketGraphs, bucket, fill
from embedsvc.backends.torch_backend import load_torch_model
from tests.support import spec
from tests.support.models import MINILM_PATH


def eager(folder: Path) -> tuple[Any, Any]:
    """The model as the backend loads it, and its untraced pooled module (what a CUDA
    graph captures)."""
    loaded = load_torch_model(spec(folder.name), folder)
    plan = bert.plan(folder)
    assert plan is not None
    return loaded, bert.pooled(bert.build(plan, "cpu", "float32"), plan.pooling).eval()


def batch_of(rows: int, width: int, seed: int) -> PaddedBatch:
    """Random ids; each row a different length (row 0 the full width)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 2000, size=(rows, width), dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for r in range(rows):
        mask[r, : max(1, width - r * 3)] = 1
    ids[mask == 0] = 0
    return PaddedBatch(ids, mask)


def test_buckets_are_powers_of_two_within_the_limits() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 100, 128)] == [1, 2, 4, 8, 128, 128]
    g = BucketGraphs(None, "cpu", pad_id=0, max_len=77, max_tokens=4096, capture=False)
    assert g.shape_for(1, 3) == (1, 16)  # positions start at 16
    assert g.shape_for(3, 17) == (4, 32)
    assert g.shape_for(100, 20) == (128, 32)
    assert g.shape_for(2, 70) == (2, 77)  # never past the model's longest input
    assert g.shape_for(128, 33) is None  # 128 x 64 padded positions: too large for a graph
    assert g.shape_for(64, 64) == (64, 64)


def test_fill_pads_positions_masked_and_rows_with_one_token() -> None:
    host = np.full((2, 4, 16), -1, dtype=np.int64)
    fill(host, batch_of(3, 5, seed=1), pad_id=7)
    ids, mask = host
    assert (ids[:3, 5:] == 7).all() and (mask[:3, 5:] == 0).all()
    assert mask[:3, :5].sum() == 5 + 2 + 1  # the batch's own mask, unchanged
    assert (ids[3] == 7).all() and mask[3].tolist() == [1] + [0] * 15


@pytest.mark.parametrize("name", ["tiny-bge", "minilm"])
def test_padded_passes_give_each_row_its_own_vector(name: str, model_dir: Path) -> None:
    folder = MINILM_PATH if name == "minilm" else model_dir / name
    loaded, module = eager(folder)
    backend = loaded.backend
    graphs = BucketGraphs(module, "cpu", loaded.pad_token_id, loaded.max_seq_length, capture=False)
    for k, (rows, width) in enumerate([(1, 4), (3, 17), (5, 9), (16, 16)]):
        batch = batch_of(rows, width, seed=k)
        plain = backend.forward(batch).pooled  # the traced pass the backend runs otherwise
        got = graphs.forward(batch)
        assert got is not None and got.shape == plain.shape
        np.testing.assert_allclose(got, plain, atol=2e-5, rtol=1e-4)
        backend.graphs = graphs  # the backend's path through the buckets
        np.testing.assert_allclose(backend.forward(batch).pooled, plain, atol=2e-5, rtol=1e-4)
        backend.graphs = None
    assert sorted(graphs._graphs) == [(1, 16), (4, 32), (8, 16), (16, 16)]
    # Larger than a graph's budget: left to the traced pass.
    assert graphs.forward(batch_of(200, 40, seed=9)) is None


def test_a_graph_that_does_not_reproduce_the_module_is_refused(model_dir: Path) -> None:
    """The check each captured graph must pass: the vectors of a batch smaller than the
    bucket in both directions, padding included, against the module itself."""
    loaded, module = eager(model_dir / "tiny-bge")
    good = BucketGraphs(module, "cpu", loaded.pad_token_id, 128, capture=False)
    g = good._build((8, 32))
    assert g is not None and good._reproduces(g, 8, 32)

    class BatchDependent(torch.nn.Module):
        """Rows depend on the whole batch (filler rows change them)."""

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out = module(ids, mask)
            return out - out.mean(0, keepdim=True)

    bad = BucketGraphs(BatchDependent(), "cpu", loaded.pad_token_id, 128, capture=False)
    g = bad._build((8, 32))
    assert g is not None and not bad._reproduces(g, 8, 32)
