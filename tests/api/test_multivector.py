"""Token vectors (multi-vector, ColBERT) of a BGE-M3-shaped folder: tiny-bge's weights with
BGE-M3's two heads (sparse_linear.pt, colbert_linear.pt, pickled Linear state dicts as
BAAI/bge-m3 ships them): /embed_multivector equals FlagEmbedding's
`BGEM3FlagModel.encode(return_colbert_vecs=True)` for mixed lengths in one request and one
by one, beside dense and lexical requests that share passes; the answer's size is bounded."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedsvc.registry import load_registry
from tests.support import Server, rows_close, run_server
from tests.support.models import build_tiny_m3

WORDS = "the capital of france is paris and rivers flow to the sea while mountains rise".split()
TEXTS = ["paris", "what is the capital of china?"] + [
    " ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in (6, 20, 55)
]


@pytest.fixture(scope="module")
def m3(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    root = tmp_path_factory.mktemp("m3-multi")
    folder = build_tiny_m3(root / "tiny-m3", model_dir / "tiny-bge")
    (root / "models.yaml").write_text(
        "default_models: [tiny-m3]\nmodels:\n  - name: tiny-m3\n    hf_id: test/tiny-m3\n"
        f"    revision: '{'0' * 40}'\n    local_dir: {folder}\n    pooling: cls\n"
        "    max_seq_length: 64\n    lexical_weights: true\n    multivector: true\n"
    )
    with run_server(load_registry(root / "models.yaml"), ["tiny-m3"]) as s:
        yield s, folder


@pytest.fixture(scope="module")
def reference(m3: tuple[Any, Path]) -> dict[str, Any]:
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(str(m3[1]), use_fp16=False, devices="cpu")
    return dict(
        model.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    )


def test_token_vectors_equal_bge_m3(m3: tuple[Any, Path], reference: dict[str, Any]) -> None:
    s, _ = m3
    want = reference["colbert_vecs"]
    with s.client() as c:
        together = c.post("/embed_multivector", json={"inputs": TEXTS}).json()
        alone = [c.post("/embed_multivector", json={"inputs": t}).json()[0] for t in TEXTS]
        packed = c.post(
            "/embed_multivector", json={"inputs": TEXTS, "encoding_format": "base64"}
        ).json()
        dimension = c.get("/info").json()["models"][0]["dimension"]
    for got in (together, alone):
        assert [len(rows) for rows in got] == [len(w) for w in want]
        for rows, w in zip(got, want, strict=True):
            rows_close(rows, w)
    for text, w in zip(packed, want, strict=True):
        rows = np.frombuffer(base64.b64decode(text), "<f4").reshape(-1, dimension)
        rows_close(rows, w)


def test_dense_lexical_and_token_vectors_share_passes(
    m3: tuple[Any, Path], reference: dict[str, Any]
) -> None:
    """Requests of the three outputs at once, so passes mix them: each gets its own."""
    s, _ = m3
    results: dict[str, Any] = {}

    def call(key: str, path: str) -> None:
        with s.client() as c:
            results[key] = c.post(path, json={"inputs": TEXTS}).json()

    paths = {"dense": "/embed", "sparse": "/embed_sparse", "multi": "/embed_multivector"}
    threads = [threading.Thread(target=call, args=item) for item in paths.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows_close(results["dense"], reference["dense_vecs"])
    for rows, w in zip(results["multi"], reference["colbert_vecs"], strict=True):
        rows_close(rows, w)
    for got, want in zip(results["sparse"], reference["lexical_weights"], strict=True):
        assert {int(e["index"]) for e in got} == {int(k) for k in want}


def test_refusals(m3: tuple[Any, Path], server: Server) -> None:
    s, _ = m3
    with s.client() as c:
        # 4096 long inputs: 413 from the size of the answer, before any forward pass.
        r = c.post("/embed_multivector", json={"inputs": [" ".join(WORDS * 3)] * 4096})
        assert r.status_code == 413 and "max_multivector_values" in r.json()["error"], r.text
        r = c.post("/embed_multivector", json={"inputs": "x", "encoding_format": "int8"})
        assert r.status_code == 422 and "encoding_format" in r.json()["error"]
        assert c.post("/embed_multivector", json={"inputs": "still"}).status_code == 200
    with server.client() as c:  # MiniLM has no ColBERT head
        r = c.post("/embed_multivector", json={"inputs": "x"})
        assert r.status_code == 422 and "has no multi-vector output" in r.json()["error"]


def test_encode_gives_every_output_of_one_pass(
    m3: tuple[Any, Path], reference: dict[str, Any]
) -> None:
    """/encode with the three outputs: each equals its own route and the reference, and
    each input goes through the model once (the inputs forwarded, from the metrics)."""
    s, _ = m3
    forwarded = "embedsvc_batch_size_sum"
    with s.client() as c:
        before = s.metric(forwarded, model="tiny-m3")
        both = c.post("/encode", json={"inputs": TEXTS,
                                       "outputs": ["dense", "sparse", "multivector"]})  # fmt: skip
        assert s.metric(forwarded, model="tiny-m3") - before == len(TEXTS)
        dense = c.post("/embed", json={"inputs": TEXTS}).json()
        sparse = c.post("/embed_sparse", json={"inputs": TEXTS}).json()
        multi = c.post("/embed_multivector", json={"inputs": TEXTS}).json()
        only = c.post("/encode", json={"inputs": TEXTS, "outputs": ["sparse", "multivector"]})
    assert both.status_code == 200, both.text
    items = both.json()
    rows_close([i["dense"] for i in items], dense)
    rows_close([i["dense"] for i in items], reference["dense_vecs"])
    assert [i["sparse"] for i in items] == sparse
    for item, rows, want in zip(items, multi, reference["colbert_vecs"], strict=True):
        rows_close(item["multivector"], rows)
        rows_close(item["multivector"], want)
    assert [sorted(i) for i in only.json()] == [["multivector", "sparse"]] * len(TEXTS)


def test_encode_refusals(m3: tuple[Any, Path], server: Server) -> None:
    s, _ = m3
    with s.client() as c:
        r = c.post("/encode", json={"inputs": "x", "outputs": []})
        assert r.status_code == 422 and "outputs" in r.json()["error"]
        r = c.post("/encode", json={"inputs": "x", "outputs": ["colbert"]})
        assert r.status_code == 422 and "outputs[0]" in r.json()["error"]
    with server.client() as c:  # MiniLM: dense only
        r = c.post("/encode", json={"inputs": "x", "outputs": ["dense", "sparse"]})
        assert r.status_code == 422 and "has no sparse output" in r.json()["error"]
        r = c.post("/encode", json={"inputs": "x", "outputs": ["dense"]})
        assert r.status_code == 200 and len(r.json()[0]["dense"]) == 384
