"""SPLADE (task: sparse) on TEI's /embed_sparse against sentence-transformers'
SparseEncoder on the same folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Server

TEXTS = ["what is the capital of france", "Paris is the capital of France.", "bananas"]


@pytest.fixture(scope="module")
def sserver(registry: Any) -> Iterator[Server]:
    from tests.conftest import run_server

    with run_server(registry, ["all-minilm-l6-v2", "tiny-splade"]) as s:
        yield s


def dense(rows: list[list[dict[str, Any]]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.float32)
    for r, row in enumerate(rows):
        for entry in row:
            out[r, entry["index"]] = entry["value"]
    return out


def test_embed_sparse_equals_sparse_encoder(sserver: Server, model_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    se = SparseEncoder(str(model_dir / "tiny-splade"), device="cpu")
    want = se.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    with sserver.client() as c:
        r = c.post("/embed_sparse", json={"inputs": TEXTS})
        one = c.post("/embed_sparse", json={"inputs": TEXTS[0], "model": "tiny-splade"})
    assert r.status_code == 200, r.text
    rows = r.json()
    for row in rows:
        indices = [e["index"] for e in row]
        assert indices == sorted(indices) and all(e["value"] > 0 for e in row)
    got = dense(rows, want.shape[1])
    assert (got > 0).sum() == (want > 0).sum()  # the same non-zero entries
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert 0 < (want > 0).sum(axis=1).max() < want.shape[1] // 4  # sparse, not dense
    np.testing.assert_allclose(dense(one.json(), want.shape[1])[0], want[0], atol=1e-4)


def test_sparse_task_errors(sserver: Server) -> None:
    with sserver.client() as c:
        r = c.post("/embed", json={"inputs": "a", "model": "tiny-splade"})
        assert r.status_code == 422 and "tiny-splade" in r.json()["error"]
        assert "/embed_sparse" in r.json()["error"]
        r = c.post("/embed_sparse", json={"inputs": "a", "model": "all-minilm-l6-v2"})
        assert r.status_code == 422 and "task embed" in r.json()["error"]
        r = c.post("/embed_sparse", json={"inputs": ""})
        assert r.status_code == 400 and r.json()["error_type"] == "Empty"
        r = c.post("/embed_sparse", json={"inputs": 5})
        assert r.status_code == 422 and r.json()["error_type"] == "Validation"
        info = {m["name"]: m for m in c.get("/info").json()["models"]}
        assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200
    assert info["tiny-splade"]["task"] == "sparse"
    assert info["tiny-splade"]["dimension"] == 30522
