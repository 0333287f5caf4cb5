"""Cohere's embed API v2 (POST /v2/embed) through the official `cohere` client: every
embedding type equal to what /embed answers for the same texts and options, input_type
mapped onto the model's prompts, truncate NONE / START / END, max_tokens, and errors in
Cohere's shape."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from embedsvc.registry import Registry
from tests.support import Server, cosine, run_server

TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "a river"]
LONG = "the river runs to the sea and the sea runs to the sky " * 40


@pytest.fixture(scope="module")
def cohere_server(registry: Registry) -> Iterator[Server]:
    models = ["all-minilm-l6-v2", "tiny-nomic", "tiny-e5", "tiny-bge"]
    with run_server(registry, models, cache_bytes=1 << 20) as s:
        yield s


def client(server: Server) -> Any:
    import cohere

    return cohere.ClientV2(api_key="unused", base_url=server.url)


def tei(server: Server, texts: list[str], **kw: Any) -> Any:
    r = httpx.post(server.url + "/embed", json={"inputs": texts, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json())


def test_every_embedding_type_equals_embed(cohere_server: Server) -> None:
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    res = client(cohere_server).embed(
        model="all-minilm-l6-v2", texts=TEXTS, input_type="search_document", embedding_types=types
    )
    assert res.response_type == "embeddings_by_type"
    assert res.texts == TEXTS and res.id
    assert res.meta.api_version.version == "2"
    assert res.meta.billed_units.input_tokens > len(TEXTS)
    e = res.embeddings
    floats = tei(cohere_server, TEXTS, model="all-minilm-l6-v2")
    np.testing.assert_allclose(e.float_, floats, atol=1e-6)
    decoded = [np.frombuffer(base64.b64decode(s), dtype="<f4") for s in e.base64]
    np.testing.assert_allclose(decoded, floats, atol=1e-6)
    for name in ("int8", "uint8", "binary", "ubinary"):
        expected = tei(cohere_server, TEXTS, model="all-minilm-l6-v2", encoding_format=name)
        assert np.array_equal(np.asarray(getattr(e, name)), expected), name
    assert len(e.ubinary[0]) == 384 // 8
    assert e.int8 and min(min(r) for r in e.int8) >= -128


def test_input_type_picks_the_models_prompts(cohere_server: Server) -> None:
    co = client(cohere_server)

    def cohere_vectors(model: str, input_type: str | None) -> Any:
        if input_type is None:  # the client always sends one; Cohere's API requires it
            body = {"model": model, "texts": TEXTS}
            r = httpx.post(cohere_server.url + "/v2/embed", json=body, timeout=60)
            return np.asarray(r.json()["embeddings"]["float"])
        return np.asarray(
            co.embed(model=model, texts=TEXTS, input_type=input_type).embeddings.float_
        )

    nomic = "tiny-nomic"
    query = tei(cohere_server, TEXTS, model=nomic, prompt_name="search_query")
    document = tei(cohere_server, TEXTS, model=nomic, prompt_name="search_document")
    np.testing.assert_allclose(cohere_vectors(nomic, "search_query"), query, atol=1e-6)
    np.testing.assert_allclose(cohere_vectors(nomic, "search_document"), document, atol=1e-6)
    # No classification prompt in this model: its query prompt, as E5 and BGE cards say.
    np.testing.assert_allclose(cohere_vectors(nomic, "classification"), query, atol=1e-6)
    assert cosine(query[0], document[0]) < 0.99999  # the prompts do differ
    # Left out: the model's default prompt (tiny-e5's is its query prompt).
    e5_default = tei(cohere_server, TEXTS, model="tiny-e5")
    np.testing.assert_allclose(cohere_vectors("tiny-e5", None), e5_default, atol=1e-6)
    e5_passage = tei(cohere_server, TEXTS, model="tiny-e5", prompt_name="passage")
    np.testing.assert_allclose(cohere_vectors("tiny-e5", "search_document"), e5_passage, atol=1e-6)
    # A model without prompts gets none, whatever the input type.
    plain = tei(cohere_server, TEXTS, model="all-minilm-l6-v2")
    np.testing.assert_allclose(cohere_vectors("all-minilm-l6-v2", "clustering"), plain, atol=1e-6)


def test_output_dimension_truncate_and_max_tokens(cohere_server: Server, st_minilm: Any) -> None:
    import cohere

    co = client(cohere_server)
    res = co.embed(model="tiny-nomic", texts=TEXTS, input_type="search_query", output_dimension=16)
    expected = tei(
        cohere_server, TEXTS, model="tiny-nomic", prompt_name="search_query", dimensions=16
    )
    np.testing.assert_allclose(res.embeddings.float_, expected, atol=1e-6)

    model = "all-minilm-l6-v2"
    for truncate, direction in (("END", "Right"), ("START", "Left")):
        got = co.embed(model=model, texts=[LONG], input_type="search_document", truncate=truncate)
        cut = tei(cohere_server, [LONG], model=model, truncate=True, truncation_direction=direction)
        np.testing.assert_allclose(got.embeddings.float_, cut, atol=1e-6)
    with pytest.raises(cohere.UnprocessableEntityError) as refused:
        co.embed(model=model, texts=["short", LONG], input_type="search_document", truncate="NONE")
    assert "texts[1] has" in refused.value.body["message"]
    assert "more than this model's limit of 256" in refused.value.body["message"]

    # max_tokens cuts each text where sentence-transformers cuts it at that length
    # (special tokens included). The whole text (under the model's limit) is cached by the
    # first request; the second must not be answered from it.
    medium = LONG[:200]

    def hits() -> float:
        return cohere_server.metric("embedsvc_cache_total", model=model, outcome="hit")

    whole = co.embed(model=model, texts=[medium], input_type="search_document")
    before = hits()
    cut = co.embed(model=model, texts=[medium], input_type="search_document", max_tokens=12)
    st_minilm.max_seq_length = 12
    try:
        reference = st_minilm.encode([medium], normalize_embeddings=True)[0]
    finally:
        st_minilm.max_seq_length = 256
    assert cosine(cut.embeddings.float_[0], reference) > 0.99999
    assert cosine(whole.embeddings.float_[0], reference) < 0.999
    assert hits() == before
    again = co.embed(model=model, texts=[medium], input_type="search_document")
    assert again.embeddings.float_ == whole.embeddings.float_
    assert hits() == before + 1
    with pytest.raises(cohere.UnprocessableEntityError) as short:
        co.embed(model=model, texts=[medium], input_type="search_document", max_tokens=12,
                 truncate="NONE")  # fmt: skip
    assert "more than the limit of 12" in short.value.body["message"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"images": ["data:image/png;base64,AAAA"]}, 422, "images is not supported"),
        ({"inputs": [{"content": [{"type": "text", "text": "x"}]}]}, 422, "send the texts"),
        ({}, 422, "texts is required"),
        ({"texts": ["x"], "embedding_types": ["float", "half"]}, 422, "'ubinary'"),
        ({"texts": ["x"], "input_type": "image"}, 422, "'search_query'"),
        ({"texts": ["x"], "truncate": "MIDDLE"}, 422, "'START'"),
        ({"texts": ["x"], "max_tokens": 0}, 422, "max_tokens"),
        ({"texts": ["x"], "model": "embed-v4.0"}, 404, "embed-v4.0"),
        ({"texts": ["x"], "output_dimension": 7, "model": "tiny-nomic"}, 422, "32, 16, 8"),
        ({"texts": ["x"], "max_tokens": 5, "model": "tiny-e5"}, 200, ""),
    ],
)
def test_bad_requests_get_cohere_shaped_errors(
    cohere_server: Server, body: dict[str, Any], status: int, words: str
) -> None:
    r = httpx.post(cohere_server.url + "/v2/embed", json=body, timeout=60)
    assert r.status_code == status, r.text
    if status != 200:
        assert set(r.json()) == {"message"}
        assert words in r.json()["message"]
    # The server keeps serving.
    assert httpx.post(cohere_server.url + "/v2/embed", json={"texts": ["ok"]}).status_code == 200
