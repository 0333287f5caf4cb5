"""POST /similarity (TEI) and the sentence-similarity task on POST / that
huggingface_hub's InferenceClient sends, against sentence-transformers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.support import Server

SOURCE = "That is a happy person"
SENTENCES = ["That is a happy dog", "That is a very happy person", "Today is a sunny day"]


def expected(st: Any, source: str, sentences: list[str], prompt: str = "") -> np.ndarray:
    vecs = st.encode([source, *sentences], prompt=prompt, normalize_embeddings=True)
    return vecs[1:] @ vecs[0]


def test_similarity_route_and_inference_client(server: Server, st_minilm: Any) -> None:
    from huggingface_hub import InferenceClient

    want = expected(st_minilm, SOURCE, SENTENCES)
    with server.client() as c:
        r = c.post(
            "/similarity", json={"inputs": {"source_sentence": SOURCE, "sentences": SENTENCES}}
        )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json(), want, atol=1e-5)
    got = InferenceClient(model=server.url).sentence_similarity(SOURCE, SENTENCES)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert int(np.argmax(got)) == 1


def test_similarity_parameters_and_model(server: Server, model_dir: Any) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir / "tiny-nomic"), device="cpu", local_files_only=True)
    body = {
        "inputs": {"source_sentence": SOURCE, "sentences": SENTENCES},
        "model": "tiny-nomic",
        "parameters": {"prompt_name": "search_query"},
    }
    with server.client() as c:
        got = c.post("/similarity", json=body).json()
        root = c.post("/", json=body).json()
    want = expected(st, SOURCE, SENTENCES, prompt="search_query: ")
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(root, want, atol=1e-5)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"inputs": {"source_sentence": "a", "sentences": []}}, 400, "sentences is empty"),
        ({"inputs": {"source_sentence": "a"}}, 422, "sentences"),
        ({"inputs": {"source_sentence": 5, "sentences": ["b"]}}, 422, "source_sentence"),
        ({"inputs": {"source_sentence": "", "sentences": ["b"]}}, 400, "empty"),
        ({"inputs": "just text"}, 422, "inputs"),
    ],
)
def test_bad_similarity_requests(server: Server, body: dict, status: int, words: str) -> None:
    with server.client() as c:
        for path in ("/similarity", "/"):
            if path == "/" and isinstance(body["inputs"], str):
                continue  # text on / is an embedding request
            r = c.post(path, json=body)
            assert r.status_code == status, (path, r.text)
            err = r.json()
            assert set(err) == {"error", "error_type"} and words in err["error"], err
        assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200
