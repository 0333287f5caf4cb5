"""The TEI routes answer in the shapes TEI 1.9.3 documents in its OpenAPI document
(`docs/openapi.json` of text-embeddings-inference): `Info`, `EmbedResponse` and
`ErrorResponse`. The schemas below restate those facts (required fields, types, enums);
clients generated from TEI's document rely on them."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tests.support import Server

COUNT = {"type": "integer", "minimum": 0}
NULLABLE_STRING = {"type": ["string", "null"]}
EMBEDDING_MODEL = {
    "type": "object",
    "required": ["pooling"],
    "properties": {"pooling": {"type": "string"}},
}

INFO = {
    "type": "object",
    "required": (
        "model_id model_dtype served_model_name model_type max_concurrent_requests "
        "max_input_length max_batch_tokens max_client_batch_size auto_truncate "
        "tokenization_workers version"
    ).split(),
    "properties": {
        "model_id": {"type": "string"},
        "model_sha": NULLABLE_STRING,
        "model_dtype": {"type": "string"},
        "served_model_name": {"type": "string"},
        # ModelType: exactly one of classifier | embedding | reranker.
        "model_type": {
            "type": "object",
            "oneOf": [
                {"required": ["embedding"], "properties": {"embedding": EMBEDDING_MODEL}},
                {"required": ["classifier"]},
                {"required": ["reranker"]},
            ],
        },
        "max_concurrent_requests": COUNT,
        "max_input_length": COUNT,
        "max_batch_tokens": COUNT,
        "max_batch_requests": {"type": ["integer", "null"], "minimum": 0},
        "max_client_batch_size": COUNT,
        "auto_truncate": {"type": "boolean"},
        "tokenization_workers": COUNT,
        "version": {"type": "string"},
        "sha": NULLABLE_STRING,
        "docker_label": NULLABLE_STRING,
    },
}

EMBED_RESPONSE = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}

ERROR_RESPONSE = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {
        "error": {"type": "string"},
        "error_type": {
            "enum": ["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]
        },
    },
}


def test_info_matches_teis_info_schema(server: Server) -> None:
    with server.client() as c:
        info = c.get("/info").json()
    jsonschema.validate(info, INFO)
    # The name the OpenAI route answers to, as TEI's --served-model-name.
    assert info["served_model_name"] == "all-minilm-l6-v2"
    with server.client() as c:
        r = c.post("/v1/embeddings", json={"input": "x", "model": info["served_model_name"]})
    assert r.status_code == 200


def test_embed_matches_teis_embed_response(server: Server) -> None:
    with server.client() as c:
        one = c.post("/embed", json={"inputs": "hello"})
        many = c.post("/embed", json={"inputs": ["a", "b c"], "normalize": False})
    for r in (one, many):
        assert r.status_code == 200
        jsonschema.validate(r.json(), EMBED_RESPONSE)
    assert len(many.json()) == 2 and len(many.json()[0]) == 384


def test_long_inputs_are_cut_by_default_as_tei_cuts_them_and_the_answer_says_so(
    server: Server,
) -> None:
    """TEI 1.9 truncates by default (--auto-truncate true): a long input gets the vector
    of its first 256 tokens here too, as with truncate=true, and x-truncated-inputs
    counts the inputs cut (absent when none was); truncate=false still refuses."""
    long = "the river flows past the old mill " * 80  # far over MiniLM's 256 tokens
    with server.client() as c:
        cut = c.post("/embed", json={"inputs": ["short", long]})
        asked = c.post("/embed", json={"inputs": ["short", long], "truncate": True})
        refused = c.post("/embed", json={"inputs": long, "truncate": False})
        whole = c.post("/embed", json={"inputs": "short"})
        openai = c.post("/v1/embeddings", json={"input": [long, long, "x"]})
    assert cut.status_code == 200 and cut.headers["x-truncated-inputs"] == "1"
    assert cut.json() == asked.json()
    assert refused.status_code == 422 and "truncate=true" in refused.json()["error"]
    assert whole.status_code == 200 and "x-truncated-inputs" not in whole.headers
    assert openai.status_code == 200 and openai.headers["x-truncated-inputs"] == "2"
    assert openai.json()["usage"]["prompt_tokens"] == 256 + 256 + 3


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"inputs": []}, 400),  # empty batch
        ({"inputs": "x", "model": "no-such-model"}, 422),
        ({"inputs": "x", "truncate": "maybe"}, 422),
        ({"inputs": "word " * 5000, "truncate": False}, 422),  # too long
        ({"inputs": ["x"] * 4097}, 413),  # more inputs than may be in flight
        ({"inputs": "x", "prompt_name": "nope"}, 422),
        ({"inputs": "x", "dimensions": 7}, 422),
    ],
)
def test_errors_match_teis_error_response(
    server: Server, body: dict[str, Any], status: int
) -> None:
    with server.client() as c:
        r = c.post("/embed", json=body)
    assert r.status_code == status, r.text
    jsonschema.validate(r.json(), ERROR_RESPONSE)
    assert r.json()["error"]  # a message a person can act on
