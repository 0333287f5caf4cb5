"""The exact-match vector cache (--cache-bytes, engine/cache.py) on a real server: a
repeated request gets the same vectors without a forward pass, everything that changes a
vector is in the key, and the bytes stay within the bound."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from embedsvc.registry import Registry
from embedsvc.settings import Settings
from tests.support import Server, run_server

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def cached(registry: Registry) -> Iterator[Server]:
    with run_server(registry, [MODEL, "tiny-bge"], cache_bytes=1 << 20) as s:
        yield s


def counts(s: Server, model: str = MODEL) -> dict[str, float]:
    return {
        "passes": s.metric("embedsvc_batches_total", model=model),
        "hit": s.metric("embedsvc_cache_total", model=model, outcome="hit"),
        "miss": s.metric("embedsvc_cache_total", model=model, outcome="miss"),
        "evicted": s.metric("embedsvc_cache_total", model=model, outcome="evicted"),
        "bytes": s.metric("embedsvc_cache_bytes", model=model),
    }


def post(s: Server, path: str, body: dict[str, Any]) -> Any:
    with s.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r


def test_a_repeated_request_gets_the_same_vectors_without_a_forward_pass(cached: Server) -> None:
    body = {"inputs": ["the cache test's first text", "and its second"], "model": MODEL}
    first = post(cached, "/embed", body)
    before = counts(cached)
    again = post(cached, "/embed", body)
    after = counts(cached)
    assert again.content == first.content  # the same bytes: identical vectors
    assert after["passes"] == before["passes"]  # no forward pass
    assert after["hit"] == before["hit"] + 2 and after["miss"] == before["miss"]
    assert 0 < after["bytes"] <= 1 << 20
    # The OpenAI route asks for the same vectors: answered from the cache too, with the
    # tokens each input took when it was embedded.
    openai = post(cached, "/v1/embeddings", {"input": body["inputs"], "model": MODEL}).json()
    assert counts(cached)["passes"] == before["passes"]
    assert [d["embedding"] for d in openai["data"]] == first.json()
    assert openai["usage"]["prompt_tokens"] == int(first.headers["x-compute-tokens"])


def test_a_request_with_one_new_input_runs_whole_and_is_kept(cached: Server) -> None:
    known = {"inputs": ["a text seen before"], "model": MODEL}
    post(cached, "/embed", known)
    before = counts(cached)
    mixed = post(cached, "/embed", {"inputs": ["a text seen before", "a new one"], "model": MODEL})
    middle = counts(cached)
    assert middle["passes"] > before["passes"] and middle["miss"] == before["miss"] + 2
    assert post(cached, "/embed", {"inputs": ["a new one"], "model": MODEL}).json() == [
        mixed.json()[1]
    ]
    assert counts(cached)["passes"] == middle["passes"]


@pytest.mark.parametrize(
    "change",
    [
        {"normalize": False},
        {"dimensions": 384},  # the full size: the same numbers, asked another way
        {"truncate": False},
        {"truncation_direction": "Left"},
        {"prompt_name": "query", "model": "tiny-bge"},
        {"model": "tiny-bge"},  # each model its own cache: never another model's vector
    ],
)
def test_everything_that_changes_a_vector_is_in_the_key(
    cached: Server, change: dict[str, Any]
) -> None:
    model = str(change.get("model", MODEL))
    base = {"inputs": f"a key test for {sorted(change)}", "model": MODEL}
    if "prompt_name" in change:
        base["model"] = model
    plain = post(cached, "/embed", base).json()
    before = counts(cached, model)
    other = post(cached, "/embed", {**base, **change}).json()
    after = counts(cached, model)
    assert after["passes"] > before["passes"] and after["hit"] == before["hit"], change
    if "normalize" in change or "model" in change:
        assert other != plain


def test_the_cache_stays_within_its_bytes(registry: Registry) -> None:
    limit = 8_000  # about four MiniLM vectors with their keys
    with run_server(registry, [MODEL], cache_bytes=limit) as s:
        texts = [f"bounded cache text number {i}" for i in range(12)]
        for t in texts:
            post(s, "/embed", {"inputs": t})
        c = counts(s)
        assert 0 < c["bytes"] <= limit and c["evicted"] >= 8
        post(s, "/embed", {"inputs": texts[-1]})  # the newest is kept
        assert counts(s)["hit"] == c["hit"] + 1
        post(s, "/embed", {"inputs": texts[0]})  # the oldest went first
        assert counts(s)["miss"] == c["miss"] + 1


def test_off_by_default(server: Server) -> None:
    assert Settings().cache_bytes == 0
    body = {"inputs": "asked twice of a server without a cache"}
    post(server, "/embed", body)
    before = counts(server)
    post(server, "/embed", body)
    assert counts(server)["passes"] > before["passes"] and counts(server)["hit"] == 0
