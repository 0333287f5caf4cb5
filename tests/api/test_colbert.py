"""ColBERT models of their own (task multivector): tiny folders saved as PyLate saves them
(tests/support/models.build_tiny_colbert), served on /embed_multivector, against
sentence-transformers' MultiVectorEncoder (which reproduces PyLate's vectors) encoding the
same texts as queries and as documents: the markers, the query expansion with [MASK]
tokens the model does or does not attend to, and the document punctuation skiplist."""

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
from tests.support.models import build_tiny_colbert

WORDS = "the capital of france is paris, and rivers flow to the sea; mountains rise!".split()
TEXTS = ["paris", "what is the capital of china?"] + [
    " ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in (6, 11, 40, 150)
]  # the last is over a document's 128 tokens (truncate: true cuts it as the library does)
# classic: expansion not attended to, punctuation skipped in documents (PyLate's defaults);
# attend: expansion attended to, no skiplist; plain: no query expansion.
VARIANTS = {
    "classic": {},
    "attend": {"attend_to_expansion_tokens": True, "skiplist_words": []},
    "plain": {"do_query_expansion": False, "query_length": 24},
}


@pytest.fixture(scope="module")
def colbert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("colbert")
    entries = ""
    for k, (name, config) in enumerate(VARIANTS.items()):
        folder = build_tiny_colbert(root / name, seed=20 + k, **config)
        entries += (
            f"  - name: {name}\n    hf_id: test/{name}\n    revision: '{'0' * 40}'\n"
            f"    local_dir: {folder}\n    task: multivector\n"
        )
    (root / "models.yaml").write_text(f"default_models: [classic]\nmodels:\n{entries}")
    with run_server(load_registry(root / "models.yaml"), list(VARIANTS)) as s:
        yield s, root


@pytest.fixture(scope="module")
def reference(colbert: tuple[Server, Path]) -> dict[tuple[str, str], list[Any]]:
    """MultiVectorEncoder's vectors of TEXTS per variant and side."""
    from sentence_transformers import MultiVectorEncoder

    out = {}
    for name in VARIANTS:
        model = MultiVectorEncoder(str(colbert[1] / name), device="cpu", local_files_only=True)
        out[name, "query"] = model.encode_query(TEXTS, convert_to_numpy=True)
        out[name, "document"] = model.encode_document(TEXTS, convert_to_numpy=True)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("side", ["query", "document"])
def test_token_vectors_equal_sentence_transformers(
    colbert: tuple[Server, Path], reference: dict[tuple[str, str], list[Any]], name: str, side: str
) -> None:
    """Mixed lengths in one request and one by one; a query longer than the expansion
    length is cut to it (truncate: true), as the library cuts it."""
    s, _ = colbert
    want = reference[name, side]
    body = {"model": name, "prompt_name": side, "truncate": True}
    with s.client() as c:
        together = c.post("/embed_multivector", json=body | {"inputs": TEXTS})
        assert together.status_code == 200, together.text
        alone = [c.post("/embed_multivector", json=body | {"inputs": t}).json()[0] for t in TEXTS]
    for got in (together.json(), alone):
        assert [len(rows) for rows in got] == [len(w) for w in want]
        for rows, w in zip(got, want, strict=True):
            rows_close(rows, w)


def test_queries_and_documents_share_passes(
    colbert: tuple[Server, Path], reference: dict[tuple[str, str], list[Any]]
) -> None:
    """Queries (expansion not attended to: the library's transformer runs their passes) and
    documents (the own encoder, alone) at once, so passes mix them: each gets its own."""
    s, _ = colbert
    results: dict[str, list[Any]] = {}

    def call(side: str) -> None:
        body = {"inputs": TEXTS, "prompt_name": side, "truncate": True}
        with s.client() as c:
            results[side] = [c.post("/embed_multivector", json=body).json() for _ in range(4)]

    threads = [threading.Thread(target=call, args=(side,)) for side in ("query", "document")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for side in ("query", "document"):
        for answer in results[side]:
            for rows, w in zip(answer, reference["classic", side], strict=True):
                rows_close(rows, w)


def test_float16_answers_are_half_the_bytes(colbert: tuple[Server, Path]) -> None:
    """base64_float16: each input's matrix as little-endian float16, the float answer's
    values to float16's precision, in half of base64's bytes."""
    s, _ = colbert
    body = {"inputs": TEXTS, "prompt_name": "query", "truncate": True}
    with s.client() as c:
        floats = c.post("/embed_multivector", json=body).json()
        b32 = c.post("/embed_multivector", json=body | {"encoding_format": "base64"}).json()
        b16 = c.post("/embed_multivector", json=body | {"encoding_format": "base64_float16"})
    assert b16.status_code == 200, b16.text
    for text, text32, rows in zip(b16.json(), b32, floats, strict=True):
        half = np.frombuffer(base64.b64decode(text), "<f2").reshape(len(rows), 16)
        np.testing.assert_allclose(half, np.asarray(rows), atol=1e-3)
        assert len(base64.b64decode(text)) * 2 == len(base64.b64decode(text32))


def test_answer_bytes_are_counted(colbert: tuple[Server, Path]) -> None:
    """embedsvc_response_bytes grows by each answer's body, per model and route."""
    s, _ = colbert
    name = "embedsvc_response_bytes_total"
    labels = {"model": "plain", "route": "/embed_multivector"}
    before = s.metric(name, **labels)
    with s.client() as c:
        sizes = [
            len(c.post("/embed_multivector", json={"inputs": TEXTS[:4], "model": "plain"}).content),
            len(c.post("/embed_multivector", json={"inputs": "x", "model": "plain"}).content),
        ]
    assert s.metric(name, **labels) - before == sum(sizes)


def test_sides_differ_as_the_model_says(
    colbert: tuple[Server, Path], reference: dict[tuple[str, str], list[Any]]
) -> None:
    """No prompt_name encodes documents (as sentence-transformers does); a classic query
    has a vector for each of its 16 positions, expansion included, and a document none for
    its punctuation."""
    s, _ = colbert
    with s.client() as c:
        default = c.post("/embed_multivector", json={"inputs": TEXTS[1]}).json()[0]
        query = c.post(
            "/embed_multivector", json={"inputs": TEXTS[1], "prompt_name": "query"}
        ).json()[0]
        tokens = c.post("/tokenize", json={"inputs": TEXTS[1], "prompt_name": "document"})
    rows_close(default, reference["classic", "document"][1])
    assert len(query) == 16
    # [CLS] [unused1] what is the capital of china ? [SEP]: the "?" has no vector.
    assert tokens.status_code == 200, tokens.text
    assert [t["text"] for t in tokens.json()[0]][:2] == ["[CLS]", "[unused1]"]
    assert len(default) == len(tokens.json()[0]) - 1


def test_info_and_refusals(colbert: tuple[Server, Path]) -> None:
    s, _ = colbert
    with s.client() as c:
        info = {m["name"]: m for m in c.get("/info").json()["models"]}
        classic = info["classic"]
        assert classic["task"] == "multivector" and classic["dimension"] == 16
        assert classic["multivector"] is True
        assert classic["colbert"] == {
            "query_prefix": "[unused0]",
            "document_prefix": "[unused1]",
            "query_length": 16,
            "document_length": 128,
            "query_expansion": 16,
            "attend_to_expansion_tokens": False,
            "skiplist_tokens": 32,
        }
        assert info["plain"]["colbert"]["query_expansion"] == 0
        r = c.post("/embed", json={"inputs": "x", "model": "classic"})
        assert r.status_code == 422 and "/embed_multivector" in r.json()["error"], r.text
        r = c.post("/embed_multivector", json={"inputs": [[101, 7592, 102]]})
        assert r.status_code == 422 and "takes text" in r.json()["error"], r.text
        r = c.post("/embed_multivector", json={"inputs": "x", "prompt_name": "passage"})
        assert r.status_code == 422 and "allowed: query, document" in r.json()["error"]
        long_query = {"inputs": " ".join(WORDS), "prompt_name": "query", "truncate": False}
        r = c.post("/embed_multivector", json=long_query)
        assert r.status_code == 422 and "limit of 16" in r.json()["error"], r.text
        # 4096 long documents: 413 from the size of the answer, before any forward pass.
        r = c.post("/embed_multivector", json={"inputs": [" ".join(WORDS * 3)] * 4096})
        assert r.status_code == 413 and "max_multivector_values" in r.json()["error"], r.text
        assert c.post("/embed_multivector", json={"inputs": "still"}).status_code == 200


def test_a_pipeline_it_cannot_compute_is_refused(tmp_path: Path) -> None:
    """A ColBERT folder whose pipeline has a module embedsvc does not run (here token
    pooling after the projection) stops start-up with the module named."""
    import json

    from embedsvc.backends.loaders import load_model
    from embedsvc.errors import ConfigError
    from tests.support import spec

    folder = build_tiny_colbert(tmp_path / "pooled", seed=30)
    modules = json.loads((folder / "modules.json").read_text())
    pooling = "sentence_transformers.multi_vector_encoder.modules.HierarchicalTokenPooling"
    modules.append({"idx": 2, "name": "2", "path": "2_Pooling", "type": pooling})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "2_Pooling").mkdir()
    (folder / "2_Pooling" / "config.json").write_text(json.dumps({"pool_factor": 2}))
    with pytest.raises(ConfigError, match="HierarchicalTokenPooling is not computed here"):
        load_model(spec("pooled", task="multivector"), folder)
