"""SPLADE (task: sparse) on TEI's /embed_sparse against sentence-transformers'
SparseEncoder on the same folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support import Server

TEXTS = ["what is the capital of france", "Paris is the capital of France.", "bananas"]


@pytest.fixture(scope="module")
def sserver(registry: Any, http_direct: bool) -> Iterator[Server]:
    from tests.support import run_server

    # The tiny random SPLADE has hundreds of entries per input (a trained one too): 4096
    # of them take more than the default max_sparse_values.
    models = ["all-minilm-l6-v2", "tiny-splade"]
    with run_server(registry, models, http_direct=http_direct, max_sparse_values=1 << 24) as s:
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


@pytest.fixture(scope="module")
def m3server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """tiny-bge's weights plus a BGE-M3-style sparse head (sparse_linear.pt, a pickled
    Linear(hidden, 1) state dict, as BAAI/bge-m3 ships it), served with lexical_weights."""
    import shutil

    import torch

    from embedsvc.registry import load_registry
    from tests.support import run_server

    root = tmp_path_factory.mktemp("m3")
    folder = root / "tiny-m3"
    shutil.copytree(model_dir / "tiny-bge", folder)
    torch.manual_seed(6)
    torch.save(
        {"weight": torch.randn(1, 32), "bias": torch.tensor([0.1])}, folder / "sparse_linear.pt"
    )
    (root / "models.yaml").write_text(
        "default_models: [tiny-m3]\nmodels:\n  - name: tiny-m3\n    hf_id: test/tiny-m3\n"
        f"    revision: '{'0' * 40}'\n    local_dir: {folder}\n    pooling: cls\n"
        "    max_seq_length: 64\n    lexical_weights: true\n"
    )
    with run_server(load_registry(root / "models.yaml"), ["tiny-m3"]) as s:
        yield s, folder


def test_bge_m3_lexical_weights(m3server: Any, server: Server) -> None:
    """The BGE-M3 reference: relu(sparse_linear(last hidden state)) per token, the largest
    weight per token id, special tokens dropped; the same model still embeds densely."""
    import threading

    import torch
    from transformers import AutoModel, AutoTokenizer

    s, folder = m3server
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    head = torch.load(folder / "sparse_linear.pt", weights_only=True)
    texts = [*TEXTS, "paris paris paris and paris again"]
    want = []
    for text in texts:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        w = torch.relu(h @ head["weight"].T + head["bias"]).squeeze(-1).tolist()
        best: dict[int, float] = {}
        for t, v in zip(enc["input_ids"][0].tolist(), w, strict=True):
            if t not in tok.all_special_ids and v > 0:
                best[t] = max(best.get(t, 0.0), v)
        want.append(best)
    results: dict[str, Any] = {}

    def call(key: str, path: str, body: dict) -> None:
        with s.client() as c:
            results[key] = c.post(path, json=body)

    # Dense and lexical requests at once, so they may share forward passes.
    jobs = [("sparse", "/embed_sparse", {"inputs": texts}), ("dense", "/embed", {"inputs": texts})]
    threads = [threading.Thread(target=call, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["sparse"].status_code == 200, results["sparse"].text
    for got, exp in zip(results["sparse"].json(), want, strict=True):
        assert [e["index"] for e in got] == sorted(exp)
        for e in got:
            assert e["value"] == pytest.approx(exp[e["index"]], rel=1e-5, abs=1e-5)
    with server.client() as c:
        bge = c.post("/embed", json={"inputs": texts, "model": "tiny-bge"}).json()
    np.testing.assert_allclose(results["dense"].json(), bge, atol=1e-5)


def test_sparse_rows_travel_as_their_non_zero_entries(sserver: Server) -> None:
    """4096 short inputs to a SPLADE model: the result the engine hands the API holds each
    input's non-zero entries (a few hundred bytes), not a 30,522-wide float row each
    (500 MB for the request), and the HTTP answer is what those entries say."""
    import asyncio

    import httpx

    from embedsvc.engine import EmbedRequest, Texts, Want

    engine = sserver.engines.get("tiny-splade", task="sparse")
    req = EmbedRequest(Texts(["a"] * 4096), want=Want.SPARSE, normalize=False)
    loop = sserver.engines.front.loop
    assert loop is not None
    result = asyncio.run_coroutine_threadsafe(engine.embed(req), loop).result(timeout=120)
    assert result.sparse is not None and len(result.sparse) == 4096
    assert result.vectors.nbytes == 0
    held = sum(idx.nbytes + val.nbytes for idx, val in result.sparse)
    assert 0 < held < 4096 * 30522 * 4 / 20
    idx, val = result.sparse[0]
    assert idx.dtype == np.int32 and val.dtype == np.float32 and (val > 0).all()
    assert (np.diff(idx) > 0).all() and idx.base is None  # sorted, not a view of a batch
    with httpx.Client(base_url=sserver.url, timeout=60) as c:
        [row] = c.post("/embed_sparse", json={"inputs": "a", "model": "tiny-splade"}).json()
    assert [e["index"] for e in row] == idx.tolist()
    # one input vs a batch of 4096: the same entries, float sums in another order
    np.testing.assert_allclose([e["value"] for e in row], val, rtol=1e-5, atol=1e-5)


def test_a_sparse_answer_past_max_sparse_values_is_413(registry: Any, http_direct: bool) -> None:
    """Nothing in a SPLADE model bounds its non-zero entries (up to its vocabulary per
    input): the entries are counted as the passes make them, and a request whose answer
    would hold more than max_sparse_values is refused before its answer is built; the
    server serves on."""
    from tests.support import run_server

    texts = [f"passage {i} about the capital of france and bananas" for i in range(64)]
    with (
        run_server(registry, ["tiny-splade"], http_direct=http_direct, max_sparse_values=5000) as s,
        s.client() as c,
    ):
        small = c.post("/embed_sparse", json={"inputs": texts[0]})
        assert small.status_code == 200, small.text
        per_input = len(small.json()[0])
        assert 0 < per_input <= 5000
        r = c.post("/embed_sparse", json={"inputs": texts})
        assert r.status_code == 413, r.text
        assert r.json()["error_type"] == "Validation"
        assert "max_sparse_values (5000)" in r.json()["error"]
        assert c.post("/embed_sparse", json={"inputs": texts[:1]}).status_code == 200
