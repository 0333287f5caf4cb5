"""Bad requests get a 4xx in the dialect's shape, naming the field; the server keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Server

LONG = "word " * 400  # far more than MiniLM's 256-token limit


def tei(server: Server, body: Any, path: str = "/embed", raw: bytes | None = None) -> Any:
    with server.client() as c:
        if raw is not None:
            return c.post(path, content=raw, headers={"content-type": "application/json"})
        return c.post(path, json=body)


def check_tei(r: Any, status: int, error_type: str, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == error_type
    for n in needles:
        assert n in body["error"], body["error"]


def check_openai(r: Any, status: int, param: str | None, *needles: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    for n in needles:
        assert n in err["message"], err["message"]


TEI_CASES = [
    ({"inputs": "x", "prompt_name": "nope", "model": "tiny-bge"}, 422, "Validation",
     ["prompt_name 'nope'", "allowed: query"]),
    ({"inputs": "x", "prompt_name": "query"}, 422, "Validation",
     ["this model has no prompts"]),
    ({"inputs": "x", "dimensions": 100}, 422, "Validation", ["dimensions 100", "allowed: 384"]),
    ({"inputs": "x", "dimensions": 0}, 422, "Validation", ["dimensions", "at least 1", "got 0"]),
    ({"inputs": "x", "dimensions": "64"}, 422, "Validation", ["dimensions"]),
    ({"inputs": LONG, "truncate": False}, 422, "Validation",
     ["inputs has 402 tokens", "limit of 256"]),
    ({"inputs": ["ok", LONG], "truncate": False}, 422, "Validation", ["inputs[1] has 402 tokens"]),
    ({"inputs": "x", "model": "nope"}, 422, "Validation", ["model 'nope' is not served"]),
    ({"inputs": []}, 400, "Empty", ["inputs is empty"]),
    ({"inputs": ""}, 400, "Empty", ["inputs is an empty string"]),
    ({"inputs": ["a", 1]}, 422, "Validation", ["inputs[1] is a number"]),
    ({"inputs": None}, 422, "Validation", ["got null"]),
    ({"inputs": [[101, "x"]]}, 422, "Validation", ["inputs[0] contains a string"]),
    ({"inputs": [[101, 10**9]]}, 422, "Validation", ["outside this model's vocabulary"]),
    ({"inputs": [101, 102], "prompt_name": "query", "model": "tiny-bge"}, 422, "Validation",
     ["prompt cannot be applied to token-id input"]),
    ({"inputs": "x", "truncation_direction": "Up"}, 422, "Validation",
     ["truncation_direction"]),
    ({"inputs": "x", "normalize": "yes"}, 422, "Validation", ["normalize"]),
    ({}, 422, "Validation", ["inputs is required"]),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "kind", "needles"), TEI_CASES)
def test_tei_errors(server: Server, body: Any, status: int, kind: str, needles: list) -> None:
    check_tei(tei(server, body), status, kind, *needles)


OPENAI_CASES = [
    ({"input": "x", "model": "nope"}, 404, "model", ["model 'nope' is not served"]),
    ({"input": "x", "model": "tiny-nomic", "dimensions": 12}, 422, "dimensions",
     ["dimensions 12", "allowed: 32, 16, 8"]),
    ({"input": "x", "model": "tiny-bge", "prompt_name": "doc"}, 422, "prompt_name",
     ["prompt_name 'doc'"]),
    ({"input": "x", "model": "tiny-bge", "input_type": "question"}, 422, "input_type",
     ["input_type"]),
    ({"input": "x", "model": "tiny-bge", "input_type": "query", "prompt_name": "query"}, 422,
     "input_type", ["either input_type or prompt_name"]),
    ({"input": "x", "encoding_format": "int4"}, 422, "encoding_format", ["encoding_format"]),
    ({"input": LONG, "model": "all-minilm-l6-v2", "truncate": False}, 422, "input",
     ["input has 402 tokens"]),
    ({"input": [], "model": "all-minilm-l6-v2"}, 400, "input", ["input is empty"]),
    ({"input": {"text": "x"}}, 422, "input", ["an object"]),
    ({"model": "all-minilm-l6-v2"}, 422, "input", ["input is required"]),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "param", "needles"), OPENAI_CASES)
def test_openai_errors(server: Server, body: Any, status: int, param: str, needles: list) -> None:
    check_openai(tei(server, body, "/v1/embeddings"), status, param, *needles)


def test_truncate_true_accepts_long_input(server: Server) -> None:
    r = tei(server, {"inputs": LONG, "truncate": True})
    assert r.status_code == 200 and len(r.json()[0]) == 384
    with server.client() as c:
        r = c.post("/v1/embeddings", json={"input": LONG, "truncate": True})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 256  # truncated tokens are not counted


def test_invalid_json_and_content_types(server: Server) -> None:
    check_tei(tei(server, None, raw=b'{"inputs": '), 422, "Validation", "not valid JSON")
    with server.client() as c:
        r = c.post("/v1/embeddings", content=b"[1,", headers={"content-type": "application/json"})
        check_openai(r, 422, None, "not valid JSON")
        # curl -d sends a form content type; the body is still read as JSON.
        r = c.post(
            "/embed",
            content=b'{"inputs":"hi"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200 and len(r.json()[0]) == 384


def test_unknown_routes_and_methods_in_dialect_shape(server: Server) -> None:
    with server.client() as c:
        check_tei(c.get("/nope"), 404, "Validation", "no route GET /nope")
        check_openai(c.get("/v1/embeddings"), 405, None, "method GET is not allowed")


def test_lone_surrogate_is_a_4xx(server: Server) -> None:
    raw = b'{"inputs": "bad \\ud800 text"}'
    check_tei(tei(server, None, raw=raw), 422, "Validation", "unpaired UTF-16 surrogate")


def test_server_keeps_serving_after_errors(server: Server) -> None:
    for body, *_ in TEI_CASES:
        tei(server, body)
    r = tei(server, {"inputs": "still here"})
    assert r.status_code == 200 and len(r.json()[0]) == 384


def test_tokenize_and_decode(server: Server) -> None:
    with server.client() as c:
        toks = c.post(
            "/tokenize", json={"inputs": "hello world", "model": "tiny-bge", "prompt_name": "query"}
        ).json()[0]
        assert toks[0]["special"] and toks[0]["text"] == "[CLS]"
        assert [t["text"] for t in toks[-3:-1]] == ["hello", "world"]
        ids = [t["id"] for t in toks]
        text = c.post("/decode", json={"ids": ids, "model": "tiny-bge"}).json()
        assert text == ["represent this sentence for searching relevant passages : hello world"]
        check_tei(c.post("/decode", json={"ids": [10**8]}), 422, "Validation", "vocabulary")
        check_tei(c.post("/tokenize", json={"inputs": []}), 400, "Empty", "inputs is empty")


def test_info_and_health(server: Server) -> None:
    with server.client() as c:
        assert c.get("/health").status_code == 200
        info = c.get("/info").json()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["max_input_length"] == 256
    assert info["max_batch_tokens"] == 2048  # auto on CPU
    nomic = next(m for m in info["models"] if m["name"] == "tiny-nomic")
    assert nomic["matryoshka_dimensions"] == [32, 16, 8] and nomic["dimension"] == 32
    assert nomic["prompts"]["search_query"] == "search_query: "
