"""TEI's /embed_all: each input's last hidden state at every token, from the bundled MiniLM
(the own BERT encoder, whose usual pass is one traced call that pools) and a tiny
Qwen3-shaped decoder (sentence-transformers' modules), against transformers' AutoModel
`last_hidden_state` of each text alone; mixed with /embed requests in the same passes; the
refusals and the bound on the answer's size."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedsvc.registry import load_registry
from tests.support import Server, rows_close, run_server
from tests.support.models import (
    MINILM_ENTRY,
    MINILM_PATH,
    build_tiny_cross_encoder,
    build_tiny_qwen3,
)

WORDS = "the capital of France is Paris and rivers flow to the sea while mountains rise".split()
TEXTS = ["Paris", "what is the capital of China?"] + [
    " ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in (6, 20, 45)
]
REVISION = "0" * 40


@pytest.fixture(scope="module")
def states_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("embed-all")
    qwen = build_tiny_qwen3(root / "tiny-qwen3", seed=11)
    reranker = build_tiny_cross_encoder(root / "tiny-reranker", seed=12)
    common = {"revision": REVISION}
    entries = [
        MINILM_ENTRY,
        common | {"name": "tiny-qwen3", "hf_id": "test/q", "local_dir": str(qwen)},
        common | {"name": "tiny-reranker", "hf_id": "test/r", "local_dir": str(reranker)},
    ]
    entries[1] |= {"pooling": "lasttoken", "max_seq_length": 256}
    entries[2] |= {"task": "rerank"}
    (root / "models.yaml").write_text(json.dumps({"models": entries}))
    names = [str(e["name"]) for e in entries]
    with run_server(load_registry(root / "models.yaml"), names) as s:
        yield s, qwen


def last_hidden_states(folder: Path, texts: list[str]) -> list[np.ndarray]:
    """transformers' AutoModel on each text alone (no padding at all)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            out.append(model(**enc).last_hidden_state[0].numpy())
    return out


@pytest.mark.parametrize("model", ["all-minilm-l6-v2", "tiny-qwen3"])
def test_token_states_equal_transformers(states_server: tuple[Server, Path], model: str) -> None:
    s, qwen = states_server
    want = last_hidden_states(MINILM_PATH if model == "all-minilm-l6-v2" else qwen, TEXTS)
    with s.client() as c:
        together = c.post("/embed_all", json={"inputs": TEXTS, "model": model})
        assert together.status_code == 200, together.text
        alone = [c.post("/embed_all", json={"inputs": t, "model": model}).json()[0] for t in TEXTS]
        packed = c.post(
            "/embed_all", json={"inputs": TEXTS, "model": model, "encoding_format": "base64"}
        ).json()
        hidden = {m["name"]: m for m in c.get("/info").json()["models"]}[model]["hidden_size"]
    for got in (together.json(), alone):
        assert [len(rows) for rows in got] == [len(w) for w in want]
        for rows, w in zip(got, want, strict=True):
            rows_close(rows, w)
            # As computed: not normalized (a hidden state's norm is far from 1).
            assert abs(float(np.linalg.norm(rows[0])) - 1.0) > 0.01
    for text, w in zip(packed, want, strict=True):
        rows_close(np.frombuffer(base64.b64decode(text), "<f4").reshape(-1, hidden), w)


def test_states_and_vectors_share_passes(states_server: tuple[Server, Path]) -> None:
    """/embed and /embed_all requests at once, so passes mix them: each gets its own."""
    s, _ = states_server
    with s.client() as c:
        vectors_alone = c.post("/embed", json={"inputs": TEXTS}).json()
    results: dict[str, Any] = {}

    def call(key: str, path: str) -> None:
        with s.client() as c:
            results[key] = [c.post(path, json={"inputs": TEXTS}).json() for _ in range(4)]

    threads = [
        threading.Thread(target=call, args=("vectors", "/embed")),
        threading.Thread(target=call, args=("states", "/embed_all")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = last_hidden_states(MINILM_PATH, TEXTS)
    for answer in results["vectors"]:
        rows_close(answer, vectors_alone)
    for answer in results["states"]:
        for rows, w in zip(answer, want, strict=True):
            rows_close(rows, w)


def test_refusals(states_server: tuple[Server, Path]) -> None:
    s, _ = states_server
    with s.client() as c:
        r = c.post("/embed_all", json={"inputs": "x", "model": "tiny-reranker"})
        assert r.status_code == 422 and "not an embedding model" in r.json()["error"], r.text
        # 4096 long inputs: 413 from the size of the answer, before any forward pass.
        r = c.post("/embed_all", json={"inputs": [" ".join(WORDS * 3)] * 4096})
        assert r.status_code == 413 and "max_multivector_values" in r.json()["error"], r.text
        r = c.post("/embed_all", json={"inputs": "x", "prompt_name": "query"})
        assert r.status_code == 422 and "prompt_name" in r.json()["error"], r.text
        assert c.post("/embed_all", json={"inputs": "still"}).status_code == 200
