"""Real clients against a real server: the openai package and huggingface_hub."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.support import Server, cosine

TEXTS = ["What is the capital of France?", "Paris is the capital of France."]


def test_openai_client_default_base64(server: Server, st_minilm: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    res = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS)
    expected = st_minilm.encode(TEXTS, normalize_embeddings=True)
    assert [d.index for d in res.data] == [0, 1]
    for d, e in zip(res.data, expected, strict=True):
        assert len(d.embedding) == 384
        assert cosine(d.embedding, e) >= 0.9999
    assert res.usage.prompt_tokens == res.usage.total_tokens > 0


def test_openai_client_dimensions_and_input_type(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    res = client.embeddings.create(
        model="tiny-nomic", input=TEXTS, dimensions=16, extra_body={"input_type": "query"}
    )
    for d in res.data:
        assert len(d.embedding) == 16
        assert abs(np.linalg.norm(d.embedding) - 1.0) < 1e-5
    floats = client.embeddings.create(
        model="tiny-nomic",
        input=TEXTS,
        dimensions=16,
        encoding_format="float",
        extra_body={"prompt_name": "search_query"},
    )
    for a, b in zip(res.data, floats.data, strict=True):
        assert cosine(a.embedding, b.embedding) > 0.99999


def test_openai_client_errors(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as nf:
        client.embeddings.create(model="gpt-nope", input="x")
    assert "gpt-nope" in nf.value.message and "all-minilm-l6-v2" in nf.value.message
    with pytest.raises(openai.UnprocessableEntityError) as dims:
        client.embeddings.create(model="tiny-nomic", input="x", dimensions=5)
    assert "allowed: 32, 16, 8" in dims.value.message
    models = client.models.list()
    assert {m.id for m in models.data} == {"all-minilm-l6-v2", "tiny-bge", "tiny-nomic", "tiny-e5"}


def test_huggingface_inference_client(server: Server, st_minilm: Any) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url)
    got = np.asarray(client.feature_extraction(TEXTS[0]))
    expected = st_minilm.encode([TEXTS[0]], normalize_embeddings=True)
    assert got.shape == (1, 384)
    assert cosine(got[0], expected[0]) >= 0.9999
    got = np.asarray(client.feature_extraction(TEXTS[1], normalize=False, truncate=True))
    assert abs(np.linalg.norm(got[0]) - 1.0) > 1e-3
