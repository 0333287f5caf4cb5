"""The request bodies (api/bodies.py): what each takes and refuses, in which words; and
the engine routes answered directly from the HTTP protocol against the same routes
answered by the FastAPI app alone: both answer alike."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from embedsvc.api.bodies import OpenAIEmbeddingsBody, TEIEmbedBody, decode
from embedsvc.errors import ValidationError
from embedsvc.registry import Registry
from tests.support import Server, run_server


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "a"},
        {"inputs": ["a", "b"], "normalize": False, "truncate": True},
        {"inputs": "a", "truncation_direction": "Left", "prompt_name": "query"},
        {"inputs": "a", "dimensions": 16, "model": "tiny-nomic", "unknown_field": [1]},
        {"inputs": "a", "truncate": None, "prompt_name": None, "dimensions": None},
        {"inputs": [[101, 102]], "encoding_format": "ubinary"},
        {"inputs": None},  # any JSON value: api/inputs.py words what is wrong with it
    ],
)
def test_tei_bodies_it_takes(body: dict) -> None:
    got = decode(TEIEmbedBody, orjson.dumps(body))
    assert got.inputs == body["inputs"]
    assert got.normalize is body.get("normalize", True)
    assert got.truncation_direction == body.get("truncation_direction", "Right")
    assert got.truncate is body.get("truncate")
    assert got.dimensions == body.get("dimensions")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "inputs", "inputs is required"),
        ({"inputs": "a", "normalize": 1}, "normalize", "normalize must be a boolean; got 1"),
        ({"inputs": "a", "normalize": None}, "normalize", "must be a boolean; got null"),
        ({"inputs": "a", "truncate": "yes"}, "truncate", 'a boolean or null; got "yes"'),
        (
            {"inputs": "a", "truncation_direction": "up"},
            "truncation_direction",
            "must be one of 'Left', 'Right', 'left', 'right'; got \"up\"",
        ),
        ({"inputs": "a", "dimensions": True}, "dimensions", "an integer or null; got true"),
        ({"inputs": "a", "dimensions": 0}, "dimensions", "an integer of at least 1; got 0"),
        ({"inputs": "a", "dimensions": 8.0}, "dimensions", "got 8.0"),
        ({"inputs": "a", "prompt_name": 3}, "prompt_name", "a string or null; got 3"),
        ({"inputs": "a", "model": ["x"]}, "model", 'a string or null; got ["x"]'),
        ([1], None, "request body must be an object; got [1]"),
    ],
)
def test_tei_bodies_it_refuses(body: Any, param: str | None, words: str) -> None:
    with pytest.raises(ValidationError) as e:
        decode(TEIEmbedBody, orjson.dumps(body))
    assert e.value.param == param
    assert words in e.value.message, e.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "a"}, None),
        ({"input": ["a"], "model": "m", "encoding_format": "base64", "user": "u"}, None),
        ({"input": "a", "input_type": "document", "dimensions": 8}, None),
        ({"input": "a", "encoding_format": "int8"}, None),
        ({"input": [[1, 2]]}, None),
        ({"input": "a", "input_type": "search"}, "input_type"),
        ({"input": "a", "user": 5}, "user"),
        ({"inputs": "a"}, "input"),
    ],
)
def test_openai_bodies(body: dict, param: str | None) -> None:
    if param is None:
        assert decode(OpenAIEmbeddingsBody, orjson.dumps(body)).input == body["input"]
        return
    with pytest.raises(ValidationError) as e:
        decode(OpenAIEmbeddingsBody, orjson.dumps(body))
    assert e.value.param == param and param in e.value.message


def test_a_body_that_is_not_json_says_so() -> None:
    for raw in (b'{"inputs": ', b"[1,", b'{"inputs": "a",}', b""):
        with pytest.raises(ValidationError, match="not valid JSON"):
            decode(TEIEmbedBody, raw)
    with pytest.raises(ValidationError, match="unpaired UTF-16 surrogate"):
        decode(TEIEmbedBody, b'{"inputs": "bad \\ud800 text"}')


def routes_only(app: Any) -> Any:
    """Serve /slow/<path> straight from the FastAPI app (no request middleware),
    everything else from the whole app (the embedding routes: directly from the HTTP
    protocol)."""

    async def both(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/slow/"):
            path = scope["path"][len("/slow") :]
            scope = dict(scope, path=path, raw_path=path.encode())
            await app.fastapi(scope, receive, send)
        else:
            await app(scope, receive, send)

    both.state = app.state  # type: ignore[attr-defined]
    both.direct = app.direct  # type: ignore[attr-defined]  # the protocol's direct route
    return both


@pytest.fixture(scope="module")
def twin(registry: Registry) -> Iterator[Server]:
    with run_server(
        registry, ["all-minilm-l6-v2", "tiny-bge", "tiny-nomic"], wrap=routes_only
    ) as s:
        yield s


SAME = [
    ("/embed", {"inputs": "what is the capital of France?"}),
    ("/embed", {"inputs": ["a", "b c"], "normalize": False}),
    ("/embed", {"inputs": "q", "model": "tiny-bge", "prompt_name": "query"}),
    ("/embed", {"inputs": "q", "model": "tiny-nomic", "dimensions": 16}),
    ("/embed", {"inputs": "word " * 300, "truncate": True, "truncation_direction": "Left"}),
    ("/", {"inputs": ["x", "y"]}),
    ("/v1/embeddings", {"input": ["one", "two"], "encoding_format": "base64"}),
    ("/v1/embeddings", {"input": "q", "model": "tiny-nomic", "input_type": "query"}),
    ("/embeddings", {"input": "q", "model": "test/tiny-bge", "dimensions": 32}),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b", "c d"]}}),
    ("/", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}),
    # errors: same status and same words
    ("/embed", {"inputs": ""}),
    ("/embed", {"inputs": ["a", ""]}),
    ("/embed", {"inputs": "word " * 300}),
    ("/embed", {"inputs": "q", "prompt_name": "nope"}),
    ("/embed", {"inputs": "q", "model": "tiny-nomic", "dimensions": 5}),
    ("/embed", {"inputs": "q", "model": "gpt-nope"}),
    ("/v1/embeddings", {"input": "q", "model": "gpt-nope"}),
    ("/v1/embeddings", {"input": "q", "input_type": "query", "prompt_name": "query"}),
    ("/v1/embeddings", {"input": ["a"] * 5000}),
    ("/embed", {"inputs": "a", "dimensions": "8"}),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int4"}),
    ("/", {"inputs": {"source_sentence": "a"}}),
]


@pytest.mark.parametrize(("path", "body"), SAME)
def test_lean_path_answers_like_the_routes(twin: Server, path: str, body: dict) -> None:
    with httpx.Client(base_url=twin.url, timeout=60) as c:
        fast = c.post(path, json=body)
        slow = c.post("/slow" + path, json=body)
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert fast.headers["content-type"] == slow.headers["content-type"]
    a, b = fast.json(), slow.json()
    if fast.status_code != 200:
        assert a == b
        return
    assert "x-request-id" in fast.headers
    for h in ("x-compute-tokens", "x-total-time", "x-inference-time"):
        assert h in fast.headers and h in slow.headers
    assert fast.headers["x-compute-tokens"] == slow.headers["x-compute-tokens"]
    if path.endswith("embeddings"):
        assert a["usage"] == b["usage"] and a["model"] == b["model"]
        va = [d["embedding"] for d in a["data"]]
        vb = [d["embedding"] for d in b["data"]]
        assert [d["index"] for d in a["data"]] == [d["index"] for d in b["data"]]
        if body.get("encoding_format") == "base64":
            import base64

            va = [np.frombuffer(base64.b64decode(v), "<f4") for v in va]
            vb = [np.frombuffer(base64.b64decode(v), "<f4") for v in vb]
        a, b = va, vb
    np.testing.assert_allclose(
        np.array(a, dtype=np.float64), np.array(b, dtype=np.float64), atol=1e-6
    )


def test_a_fault_answering_a_direct_request_is_logged_with_its_request_id(
    server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the answer fails (a fault no request can cause, hence the patch): the
    client gets the internal-error answer naming its request id, the log record carries
    the id, and the next request is answered as usual."""
    from embedsvc.api.routes import EngineRoutes
    from embedsvc.logs import RequestIdFilter

    def broken(self: EngineRoutes, call: Any, result: Any) -> Any:
        raise RuntimeError("answer could not be built")

    caplog.handler.addFilter(RequestIdFilter())
    with monkeypatch.context() as m:
        m.setattr(EngineRoutes, "answer", broken)
        r = httpx.post(server.url + "/embed", json={"inputs": "x"}, headers={"x-request-id": "f-1"})
    assert r.status_code == 424 and "f-1" in r.text  # TEI's status for a backend error
    [record] = [x for x in caplog.records if x.exc_info and "f-1" in x.getMessage()]
    assert record.request_id == "f-1"  # type: ignore[attr-defined]
    assert httpx.post(server.url + "/embed", json={"inputs": "x"}).status_code == 200
