"""The lean path of the embedding routes (api/fast.py) against the FastAPI routes it
shortens: what it takes, what it passes on, and that both answer alike."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from embedsvc.api.fast import parse_openai, parse_tei
from embedsvc.registry import Registry
from tests.conftest import Server, run_server


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "a"},
        {"inputs": ["a", "b"], "normalize": False, "truncate": True},
        {"inputs": "a", "truncation_direction": "Left", "prompt_name": "query"},
        {"inputs": "a", "dimensions": 16, "model": "tiny-nomic", "unknown_field": [1]},
        {"inputs": "a", "truncate": None, "prompt_name": None, "dimensions": None},
        {"inputs": "a", "truncate": False},
        {"inputs": "a", "normalize": False},
    ],
)
def test_tei_bodies_it_takes(body: dict) -> None:
    fields = parse_tei(body)
    assert fields is not None
    assert fields.texts == ([body["inputs"]] if isinstance(body["inputs"], str) else body["inputs"])
    assert fields.normalize is body.get("normalize", True)
    assert fields.direction == body.get("truncation_direction", "Right").lower()
    assert fields.truncate is body.get("truncate")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"inputs": []},
        {"inputs": [101, 102]},
        {"inputs": [[101, 102]]},
        {"inputs": ["a", 1]},
        {"inputs": None},
        {"inputs": "a", "normalize": 1},
        {"inputs": "a", "normalize": None},
        {"inputs": "a", "truncate": "yes"},
        {"inputs": "a", "truncation_direction": "up"},
        {"inputs": "a", "dimensions": True},
        {"inputs": "a", "dimensions": 0},
        {"inputs": "a", "dimensions": 8.0},
        {"inputs": "a", "prompt_name": 3},
        {"inputs": "a", "model": ["x"]},
    ],
)
def test_tei_bodies_it_passes_on(body: dict) -> None:
    assert parse_tei(body) is None


@pytest.mark.parametrize(
    ("body", "taken"),
    [
        ({"input": "a"}, True),
        ({"input": ["a"], "model": "m", "encoding_format": "base64", "user": "u"}, True),
        ({"input": "a", "input_type": "document", "dimensions": 8}, True),
        ({"input": "a", "encoding_format": "int8"}, False),
        ({"input": "a", "input_type": "search"}, False),
        ({"input": "a", "user": 5}, False),
        ({"input": [[1, 2]]}, False),
        ({"inputs": "a"}, False),
    ],
)
def test_openai_bodies(body: dict, taken: bool) -> None:
    assert (parse_openai(body) is not None) is taken


def routes_only(app: Any) -> Any:
    """Serve /slow/<path> straight from the FastAPI routes (no lean path, no middleware),
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
    with run_server(registry, ["all-minilm-l6-v2", "tiny-bge", "tiny-nomic"],
                    wrap=routes_only) as s:  # fmt: skip
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
    np.testing.assert_allclose(np.array(a, dtype=np.float64), np.array(b, dtype=np.float64),
                               atol=1e-6)  # fmt: skip


def test_a_fault_answering_a_direct_request_is_logged_with_its_request_id(
    server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the answer fails (a fault no request can cause, hence the patch): the
    client gets the internal-error answer naming its request id, the log record carries
    the id, and the next request is answered as usual."""
    from embedsvc.api.fast import FastEmbed
    from embedsvc.logs import RequestIdFilter

    def broken(self: FastEmbed, call: Any, result: Any) -> Any:
        raise RuntimeError("answer could not be built")

    caplog.handler.addFilter(RequestIdFilter())
    with monkeypatch.context() as m:
        m.setattr(FastEmbed, "answer", broken)
        r = httpx.post(server.url + "/embed", json={"inputs": "x"}, headers={"x-request-id": "f-1"})
    assert r.status_code in (424, 500) and "f-1" in r.text
    [record] = [x for x in caplog.records if x.exc_info and "f-1" in x.getMessage()]
    assert record.request_id == "f-1"  # type: ignore[attr-defined]
    assert httpx.post(server.url + "/embed", json={"inputs": "x"}).status_code == 200
