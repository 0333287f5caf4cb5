"""Vectors from both routes equal sentence-transformers on the same model."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from tests.support import Server, cosine
from tests.support.models import BGE_QUERY

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, and the cinema was packed on a Tuesday night.",
    "Retrieval-augmented generation grounds a language model in documents it retrieves.",
    "Short",
]


def embed_tei(server: Server, **body: Any) -> np.ndarray:
    with server.client() as c:
        r = c.post("/embed", json=body)
    assert r.status_code == 200, r.text
    return np.array(r.json(), dtype=np.float32)


def embed_openai(server: Server, **body: Any) -> tuple[np.ndarray, dict]:
    with server.client() as c:
        r = c.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    payload = r.json()
    rows = []
    for i, d in enumerate(payload["data"]):
        assert d["index"] == i and d["object"] == "embedding"
        emb = d["embedding"]
        if isinstance(emb, str):
            emb = np.frombuffer(base64.b64decode(emb), dtype="<f4")
        rows.append(emb)
    return np.array(rows, dtype=np.float32), payload


def assert_same(a: np.ndarray, b: np.ndarray, min_cos: float = 0.9999) -> None:
    assert a.shape == b.shape
    for x, y in zip(a, b, strict=True):
        assert cosine(x, y) >= min_cos


def test_reference_pair_matches_design_fact(server: Server) -> None:
    v = embed_tei(server, inputs=TEXTS[:2])
    assert abs(cosine(v[0], v[1]) - 0.75534) < 1e-4
    assert v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_both_routes_equal_sentence_transformers(server: Server, st_minilm: Any) -> None:
    expected = st_minilm.encode(TEXTS, normalize_embeddings=True)
    assert_same(embed_tei(server, inputs=TEXTS), expected)
    got, payload = embed_openai(server, input=TEXTS, model="all-minilm-l6-v2")
    assert_same(got, expected)
    tokens = sum(len(st_minilm.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert payload["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert payload["model"] == "all-minilm-l6-v2"


def test_single_string_and_hf_id_alias(server: Server, st_minilm: Any) -> None:
    expected = st_minilm.encode([TEXTS[2]], normalize_embeddings=True)
    assert_same(embed_tei(server, inputs=TEXTS[2]), expected)
    got, _ = embed_openai(server, input=TEXTS[2], model="sentence-transformers/all-MiniLM-L6-v2")
    assert_same(got, expected)


def test_base64_equals_float(server: Server) -> None:
    f, _ = embed_openai(server, input=TEXTS, model="all-minilm-l6-v2")
    b, _ = embed_openai(server, input=TEXTS, model="all-minilm-l6-v2", encoding_format="base64")
    np.testing.assert_array_equal(f, b)  # float JSON round-trips float32 exactly


def test_token_ids_equal_text(server: Server) -> None:
    with server.client() as c:
        tok = c.post("/tokenize", json={"inputs": TEXTS[:3]}).json()
    ids = [[t["id"] for t in row] for row in tok]
    assert_same(embed_tei(server, inputs=ids), embed_tei(server, inputs=TEXTS[:3]), 0.99999)
    one, _ = embed_openai(server, input=ids[0], model="all-minilm-l6-v2")
    assert_same(one, embed_tei(server, inputs=TEXTS[0]), 0.99999)


def test_left_truncation_keeps_prompt_and_special_tokens(server: Server) -> None:
    """CLS-pooled BGE: a Left-truncated query keeps [CLS] + the instruction + the text's
    tail + [SEP]; ids from /tokenize truncated Left keep [CLS] and [SEP] too."""
    long_text = " ".join(f"term{i} of the passage" for i in range(120))
    with server.client() as c:
        prompt_ids = c.post(
            "/tokenize", json={"inputs": "x", "model": "tiny-bge", "prompt_name": "query"}
        ).json()[0]
        text_ids = c.post("/tokenize", json={"inputs": long_text, "model": "tiny-bge"}).json()[0]
        limit = c.get("/info").json()["models"]
    limit = next(m for m in limit if m["name"] == "tiny-bge")["max_input_length"]
    prompt = [t["id"] for t in prompt_ids[1:-2]]  # between [CLS] and "x" [SEP]
    ids = [t["id"] for t in text_ids]
    assert len(ids) > limit
    tail = ids[1:-1][-(limit - 2 - len(prompt)) :]
    expected = [ids[0], *prompt, *tail, ids[-1]]
    got = embed_tei(
        server,
        inputs=long_text,
        model="tiny-bge",
        prompt_name="query",
        truncate=True,
        truncation_direction="Left",
    )
    assert_same(got, embed_tei(server, inputs=[expected], model="tiny-bge"), 0.99999)
    # Token ids truncated Left equal the text truncated Left (no prompt): [CLS] survives.
    from_ids = embed_tei(
        server, inputs=[ids], model="tiny-bge", truncate=True, truncation_direction="Left"
    )
    from_text = embed_tei(
        server, inputs=long_text, model="tiny-bge", truncate=True, truncation_direction="Left"
    )
    assert_same(from_ids, from_text, 0.99999)


def test_default_prompt_applies_when_a_request_names_none(server: Server, model_dir: Any) -> None:
    """tiny-e5 (default_prompt_name: query, as E5's card advises): OpenAI clients, which
    never send input_type, and TEI requests without prompt_name get the query prefix;
    input_type / prompt_name still choose."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir / "tiny-nomic"), device="cpu", local_files_only=True)
    query = st.encode(TEXTS, prompt="query: ", normalize_embeddings=True)
    passage = st.encode(TEXTS, prompt="passage: ", normalize_embeddings=True)
    plain = st.encode(TEXTS, normalize_embeddings=True)
    assert min(cosine(a, b) for a, b in zip(query, plain, strict=True)) < 0.999
    assert_same(embed_tei(server, inputs=TEXTS, model="tiny-e5"), query)
    assert_same(embed_tei(server, inputs=TEXTS, model="tiny-e5", prompt_name="passage"), passage)
    got, payload = embed_openai(server, input=TEXTS, model="tiny-e5")
    assert_same(got, query)
    assert payload["usage"]["prompt_tokens"] == sum(
        len(st.tokenizer("query: " + t)["input_ids"]) for t in TEXTS
    )
    got, _ = embed_openai(server, input=TEXTS, model="tiny-e5", input_type="passage")
    assert_same(got, passage)
    # /tokenize applies it too, so its ids embed like the text.
    with server.client() as c:
        toks = c.post("/tokenize", json={"inputs": TEXTS[0], "model": "tiny-e5"}).json()[0]
        info = c.get("/info").json()
    assert [t["text"] for t in toks[1:3]] == ["query", ":"]
    assert next(m for m in info["models"] if m["name"] == "tiny-e5")["default_prompt_name"] == (
        "query"
    )
    # A model without a default (BGE passages) is unchanged: no prompt.
    assert next(m for m in info["models"] if m["name"] == "tiny-bge")["default_prompt_name"] is None


def test_prompts_match_sentence_transformers(server: Server, model_dir: Any) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir / "tiny-bge"), device="cpu", local_files_only=True)
    queries = TEXTS[:3]
    with_prompt = st.encode(queries, prompt=BGE_QUERY, normalize_embeddings=True)
    without = st.encode(queries, normalize_embeddings=True)
    assert min(cosine(a, b) for a, b in zip(with_prompt, without, strict=True)) < 0.999
    assert_same(
        embed_tei(server, inputs=queries, model="tiny-bge", prompt_name="query"), with_prompt
    )
    got, payload = embed_openai(server, input=queries, model="tiny-bge", input_type="query")
    assert_same(got, with_prompt)
    # The prefix is counted once in usage.
    expected_tokens = sum(len(st.tokenizer(BGE_QUERY + q)["input_ids"]) for q in queries)
    assert payload["usage"]["prompt_tokens"] == expected_tokens
    # BGE passages take no prompt: input_type=passage equals plain text.
    got, _ = embed_openai(server, input=queries, model="tiny-bge", input_type="passage")
    assert_same(got, without)
    assert_same(embed_tei(server, inputs=queries, model="tiny-bge"), without)


@pytest.mark.parametrize("dims", [16, 8])
def test_matryoshka_matches_sentence_transformers_plus_layer_norm(
    server: Server, model_dir: Any, dims: int
) -> None:
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir / "tiny-nomic"), device="cpu", local_files_only=True)
    raw = st.encode(TEXTS, prompt="search_document: ", convert_to_tensor=True)
    # The Nomic v1.5 model card's recipe: layer norm, truncate, normalize.
    expected = F.normalize(F.layer_norm(raw, (raw.shape[1],))[:, :dims], p=2, dim=1).numpy()
    got = embed_tei(
        server, inputs=TEXTS, model="tiny-nomic", prompt_name="search_document", dimensions=dims
    )
    assert_same(got, expected)
    got, _ = embed_openai(
        server, input=TEXTS, model="tiny-nomic", input_type="document", dimensions=dims
    )
    assert_same(got, expected)
    # Without the layer norm the result differs, so this test can tell the two apart.
    plain = F.normalize(raw[:, :dims], p=2, dim=1).numpy()
    assert min(cosine(a, b) for a, b in zip(plain, expected, strict=True)) < 0.999


def test_no_dimensions_equals_plain_sentence_transformers(server: Server, model_dir: Any) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir / "tiny-nomic"), device="cpu", local_files_only=True)
    expected = st.encode(TEXTS, prompt="search_query: ", normalize_embeddings=True)
    got = embed_tei(server, inputs=TEXTS, model="tiny-nomic", prompt_name="search_query")
    assert_same(got, expected)


def test_full_dimensions_equal_no_dimensions(server: Server) -> None:
    """Asking for the model's full size is not a truncation: no layer norm, the same vector
    as omitting `dimensions`, so clients configured either way agree."""
    body = {"inputs": TEXTS, "model": "tiny-nomic", "prompt_name": "search_query"}
    np.testing.assert_allclose(
        embed_tei(server, **body, dimensions=32), embed_tei(server, **body), atol=1e-6
    )
    full, _ = embed_openai(server, input=TEXTS, model="tiny-nomic", dimensions=32)
    plain, _ = embed_openai(server, input=TEXTS, model="tiny-nomic")
    np.testing.assert_allclose(full, plain, atol=1e-6)


def test_normalize_false_returns_pooled_vectors(server: Server, st_minilm: Any) -> None:
    raw = embed_tei(server, inputs=TEXTS[:2], normalize=False)
    expected = st_minilm.encode(TEXTS[:2], normalize_embeddings=False)
    # all-MiniLM-L6-v2 ends in a Normalize module; the engine owns normalization, so
    # normalize=false returns the pooled vectors before it.
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert_same(raw, expected)


@pytest.mark.parametrize("name", ["all-minilm-l6-v2", "tiny-nomic"])
def test_traced_transformer_equals_the_eager_modules(server: Server, name: str) -> None:
    """The torch backend runs a trace of its own BERT encoder; on a padded batch of a shape
    it was not traced with, it gives what the sentence-transformers modules give eagerly."""
    import torch
    from sentence_transformers import SentenceTransformer

    from embedsvc.engine.batcher import Item, pad

    model = server.engines.get(name).model
    assert isinstance(model.backend._encoder, torch.jit.ScriptModule)  # type: ignore[attr-defined]
    lengths = [3, 17, 9, 30, 5, 12, 30]
    batch = pad(
        [Item(None, i, [101, *range(2000, 2000 + n - 2), 102]) for i, n in enumerate(lengths)], 0
    )
    traced = model.backend.forward(batch).pooled
    st = SentenceTransformer(str(model.path), device="cpu", local_files_only=True)
    features = {
        "input_ids": torch.from_numpy(batch.input_ids),
        "attention_mask": torch.from_numpy(batch.attention_mask),
    }
    with torch.inference_mode():
        for module in st:
            if type(module).__name__ != "Normalize":
                features = module(features)
    eager = features["sentence_embedding"].numpy()
    np.testing.assert_allclose(traced, eager, atol=1e-5)
