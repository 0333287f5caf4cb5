"""Reranking (task: rerank) against sentence-transformers' CrossEncoder on the same folder:
TEI /rerank, the Cohere/Jina /v1/rerank, truncation, big requests, wrong tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support import Server

QUERY = "what is the capital of france"
DOCS = [
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower is in Paris.",
    "Berlin is the capital of Germany.",
    "Bananas are rich in potassium.",
]


@pytest.fixture(scope="module")
def ce(model_dir: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_dir / "tiny-reranker"), device="cpu")


@pytest.fixture(scope="module")
def rserver(registry: Any, http_direct: bool) -> Iterator[Server]:
    from tests.support import run_server

    with run_server(registry, ["all-minilm-l6-v2", "tiny-reranker"], http_direct=http_direct) as s:
        yield s


def test_tei_rerank_equals_cross_encoder(rserver: Server, ce: Any) -> None:
    import torch

    want = ce.predict([(QUERY, d) for d in DOCS])
    raw = ce.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    with rserver.client() as c:
        got = c.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True}).json()
        got_raw = c.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert [g["index"] for g in got] == list(np.argsort(-want, kind="stable"))
    for g in got:
        assert abs(g["score"] - want[g["index"]]) < 1e-4 and g["text"] == DOCS[g["index"]]
    for g in got_raw:
        assert abs(g["score"] - raw[g["index"]]) < 1e-4 and "text" not in g


def test_cohere_jina_rerank(rserver: Server, ce: Any) -> None:
    want = ce.predict([(QUERY, d) for d in DOCS])
    body = {
        "model": "tiny-reranker",
        "query": QUERY,
        "top_n": 2,
        "return_documents": True,
        "documents": [DOCS[0], {"text": DOCS[1]}, DOCS[2], {"text": DOCS[3]}],
    }
    with rserver.client() as c:
        r = c.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    best = list(np.argsort(-want, kind="stable")[:2])
    assert [x["index"] for x in out["results"]] == best
    for x in out["results"]:
        assert abs(x["relevance_score"] - want[x["index"]]) < 1e-4
        assert x["document"] == {"text": DOCS[x["index"]]}
    tokens = sum(len(ce.tokenizer(QUERY, d)["input_ids"]) for d in DOCS)
    assert out["usage"] == {"total_tokens": tokens} and out["model"] == "tiny-reranker"


def test_long_documents_and_big_requests(rserver: Server, ce: Any) -> None:
    """Over-long pairs are cut as CrossEncoder cuts them (longest first, to 512 tokens);
    a query with 1,000 documents is split and queued like a big embedding request."""
    long_doc = " ".join(f"word{i} of a long passage about Paris" for i in range(150))
    docs = [long_doc, *DOCS]
    want = ce.predict([(QUERY, d) for d in docs])
    with rserver.client() as c:
        got = c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).json()["results"]
        strict = c.post("/rerank", json={"query": QUERY, "texts": docs, "truncate": False})
    for x in got:
        assert abs(x["relevance_score"] - want[x["index"]]) < 1e-4
    assert strict.status_code == 422 and "texts[0]" in strict.json()["error"]
    many = [
        f"document number {i} about {'Paris' if i % 7 == 0 else 'bananas'}" for i in range(1000)
    ]
    want = ce.predict([(QUERY, d) for d in many])
    with rserver.client() as c:
        got = c.post("/rerank", json={"query": QUERY, "texts": many}).json()
    assert len(got) == 1000
    assert max(abs(g["score"] - want[g["index"]]) for g in got) < 1e-4


def test_wrong_task_and_bad_requests(rserver: Server) -> None:
    with rserver.client() as c:
        r = c.post("/embed", json={"inputs": "a", "model": "tiny-reranker"})
        assert r.status_code == 422 and "tiny-reranker" in r.json()["error"]
        assert "rerank" in r.json()["error"]
        r = c.post("/v1/embeddings", json={"input": "a", "model": "tiny-reranker"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "model"
        r = c.post("/rerank", json={"query": "q", "texts": ["a"], "model": "all-minilm-l6-v2"})
        assert r.status_code == 422 and "all-minilm-l6-v2" in r.json()["error"]
        assert "embedding model" in r.json()["error"]
        # Without a model, each route picks the first model of its task.
        assert c.post("/embed", json={"inputs": "a"}).status_code == 200
        assert c.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200
        cases: list[tuple[str, dict, int]] = [
            ("/rerank", {"query": "", "texts": ["a"]}, 400),
            ("/rerank", {"query": "q", "texts": []}, 400),
            ("/rerank", {"query": "q", "texts": ["a", ""]}, 400),
            ("/rerank", {"query": "q", "texts": "a"}, 422),
            ("/rerank", {"query": 5, "texts": ["a"]}, 422),
            ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422),
            ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422),
            ("/v1/rerank", {"query": "q", "documents": ["a"], "model": "nope"}, 404),
            ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 422),
            ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "3"}, 422),
            ("/v1/rerank", {"query": ["q"], "documents": ["a"]}, 422),
            ("/rerank", {"query": "q", "texts": ["a"] * 10_000}, 413),
            ("/v1/rerank", {"query": "q", "documents": ["a"] * 10_000}, 413),
            ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, 422),
        ]
        for path, body, status in cases:
            r = c.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()
            assert ("error_type" in err) if path == "/rerank" else ("message" in err["error"])
        models = {m["id"]: m["task"] for m in c.get("/v1/models").json()["data"]}
        info = {m["name"]: m for m in c.get("/info").json()["models"]}
        assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200
    assert models == {"all-minilm-l6-v2": "embed", "tiny-reranker": "rerank"}
    assert info["tiny-reranker"]["task"] == "rerank"
    assert info["tiny-reranker"]["score_activation"] == "sigmoid"


def test_registry_refuses_embedding_keys_on_a_reranker(tmp_path: Path, model_dir: Path) -> None:
    from embedsvc.errors import ConfigError
    from embedsvc.registry import load_registry

    original = (model_dir / "models.yaml").read_text()
    text = original.replace("    task: rerank\n", "    task: rerank\n    pooling: cls\n")
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(ConfigError, match="apply to embedding models"):
        load_registry(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text(
        original.replace("    task: rerank\n", "    task: rerank\n    lexical_weights: true\n")
    )
    with pytest.raises(ConfigError, match="lexical_weights needs task embed"):
        load_registry(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text(text.replace("task: rerank", "task: summarize"))
    with pytest.raises(ConfigError, match="task 'summarize' is not one of embed, rerank, sparse"):
        load_registry(tmp_path / "m.yaml")
    # A classifier (task classify) takes no embedding keys either.
    (tmp_path / "m.yaml").write_text(text.replace("task: rerank", "task: classify"))
    with pytest.raises(ConfigError, match="pooling apply to embedding models, not task classify"):
        load_registry(tmp_path / "m.yaml")


def test_a_long_query_with_many_documents_is_bounded_before_pairs_are_built(
    rserver: Server, ce: Any
) -> None:
    """The query is repeated in every pair: 200,000 characters with 4,096 documents would
    be 400M tokens tokenized pair by pair. The query is tokenized once, the pairs' lengths
    checked first: without truncation a 422 naming the pair, with it a 413 for the tokens
    in all, and a smaller request with the long query scores as CrossEncoder does."""
    long_query = "capital " * 25_000
    docs = ["a"] * 4096
    with rserver.client() as c:
        r = c.post("/rerank", json={"query": long_query, "texts": docs, "truncate": False})
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith("texts[0] with the query has 25004 tokens")
        r = c.post("/v1/rerank", json={"query": long_query, "documents": docs})
        assert r.status_code == 413, r.text
        assert "max_request_tokens (300000)" in r.json()["error"]["message"]
        r = c.post("/rerank", json={"query": long_query, "texts": DOCS, "truncate": True})
        assert r.status_code == 200, r.text
        assert r.headers["x-truncated-inputs"] == str(len(DOCS))  # every pair was cut
        got = {g["index"]: g["score"] for g in r.json()}
        assert c.post("/rerank", json={"query": QUERY, "texts": DOCS}).status_code == 200
    want = ce.predict([(long_query, d) for d in DOCS])  # cut "longest_first" to 512
    for i, score in got.items():
        assert abs(score - want[i]) < 1e-4


def test_pairs_are_cut_as_the_tokenizer_cuts_them(model_dir: Path) -> None:
    """engine/pairs.py against the tokenizer's own pair encoding with "longest_first"
    truncation, over lengths on both sides of every case and odd and even limits."""
    from tokenizers import Tokenizer

    from embedsvc.engine.pairs import PairTemplate, pair_ids

    tok = Tokenizer.from_file(str(model_dir / "tiny-reranker" / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    template = PairTemplate.of(tok)
    words = ["paris", "capital", "unbelievably", "x", "42", ",", "naïve", "of"]
    texts = [
        " ".join(words[(i * 7 + k) % len(words)] for k in range(n))
        for i, n in enumerate([1, 2, 3, 5, 8, 13, 30, 61, 62, 63, 64, 65, 130, 300])
    ]
    for limit in (7, 8, 16, 33, 64, 65, 128):
        cut = Tokenizer.from_file(str(model_dir / "tiny-reranker" / "tokenizer.json"))
        cut.no_padding()
        cut.enable_truncation(limit, strategy="longest_first")
        for q in texts:
            want = [e.ids for e in cut.encode_batch([(q, d) for d in texts])]
            query = tok.encode(q, add_special_tokens=False).ids
            docs = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
            assert pair_ids(template, query, docs, limit) == want, (limit, q)
