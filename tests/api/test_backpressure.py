"""Token budgets, admission (429), client disconnects, split client batches, backend faults
and metrics, each on a dedicated real server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
import pytest

from embedsvc.backends.base import Backend, ForwardOutput, PaddedBatch
from tests.support import Server, cosine, until, wait_for

LONG = "the quick brown fox jumps over the lazy dog " * 25  # ~227 tokens


def histogram_le(server: Server, name: str, le: str) -> tuple[float, float]:
    labels = {"model": "all-minilm-l6-v2"}
    within = server.metric(f"{name}_bucket", **labels, le=le)
    return within, server.metric(f"{name}_count", **labels)


async def fire(url: str, bodies: list[dict], path: str = "/embed") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def test_batches_respect_token_budget_and_size(server_factory: Any) -> None:
    with server_factory(max_batch_tokens=1024, max_batch_size=8) as s:
        words = ["alpha", "beta gamma", "delta epsilon zeta eta", "theta " * 30, "iota " * 90]
        bodies = [{"inputs": [f"{words[i % 5]} {i}", f"{words[(i + 2) % 5]}"]} for i in range(40)]
        responses = asyncio.run(fire(s.url, bodies))
        assert all(r.status_code == 200 for r in responses)
        size_ok, n = histogram_le(s, "embedsvc_batch_size", "8.0")
        tokens_ok, n2 = histogram_le(s, "embedsvc_batch_tokens", "1024.0")
        assert n == n2 > 1
        assert size_ok == n, "a forward pass had more than max_batch_size inputs"
        assert tokens_ok == n, "a forward pass had more than max_batch_tokens padded tokens"
        assert s.metric("embedsvc_batch_size_sum", model="all-minilm-l6-v2") == 80


def test_overload_is_refused_at_once_then_service_resumes(server_factory: Any) -> None:
    with server_factory(max_concurrent_inputs=8, max_batch_size=4) as s:
        bodies = [{"inputs": [LONG] * 4} for _ in range(30)]
        t0 = time.monotonic()
        responses = asyncio.run(fire(s.url, bodies))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}
        assert codes.count(429) > 0 and codes.count(200) >= 2
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error_type"] == "Overloaded"
        assert "at capacity" in refused.json()["error"] and refused.headers["retry-after"] == "1"
        assert time.monotonic() - t0 < 60
        ok = asyncio.run(fire(s.url, [{"input": "after the storm"}], "/v1/embeddings"))[0]
        assert ok.status_code == 200
        too_big = asyncio.run(fire(s.url, [{"inputs": ["x"] * 9}]))[0]
        assert too_big.status_code == 413 and "at most 8 at once" in too_big.json()["error"]
        assert s.metric("embedsvc_request_failures_total", route="/embed", kind="overloaded") > 0
        assert s.engines.default.inflight_inputs == 0


def test_disconnected_client_inputs_never_reach_the_model(server_factory: Any) -> None:
    with server_factory(max_batch_size=4) as s:
        model_inputs = "embedsvc_batch_size_sum"

        async def scenario() -> int:
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                # Keep the model busy for a while (16 batches of 4 long inputs) ...
                busy = asyncio.create_task(c.post("/embed", json={"inputs": [LONG] * 64}))
                await until(lambda: s.engines.default.inflight_inputs > 0, what="the busy job")
                # ... then send 20 inputs and hang up before they can be served.
                async with httpx.AsyncClient(base_url=s.url, timeout=0.2) as quitter:
                    with pytest.raises(httpx.TimeoutException):
                        await quitter.post("/embed", json={"inputs": ["gone"] * 20})
                r = await busy
                return r.status_code

        assert asyncio.run(scenario()) == 200
        worker = s.engines.default.worker  # nothing left to run: anything queued has drained
        wait_for(lambda: worker.inflight_inputs == 0 and len(worker.queue) == 0)
        forwarded = s.metric(model_inputs, model="all-minilm-l6-v2")
        assert forwarded == 64, f"{forwarded - 64} inputs of the gone client reached the model"
        assert (
            s.metric("embedsvc_request_failures_total", route="/embed", kind="client_disconnected")
            == 1
        )
        assert s.engines.default.inflight_inputs == 0


def test_split_client_batch_comes_back_in_order(server_factory: Any, st_minilm: Any) -> None:
    texts = [f"passage number {i} about {'rivers' if i % 2 else 'mountains'}" for i in range(300)]
    expected = st_minilm.encode(texts, normalize_embeddings=True)
    with server_factory(max_client_batch_size=16, max_batch_size=32) as s:
        with s.client() as c:
            r = c.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
        assert r.status_code == 200
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(300))
        import base64

        for d, e in zip(data, expected, strict=True):
            v = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            assert cosine(v, e) >= 0.9999


class PoisonBackend:
    """Wraps the real backend and raises when a batch contains token id 3 ([unused2]).

    This is the one fake in the suite: a real model cannot be made to fail on demand.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.device, self.dtype, self.dimension = inner.device, inner.dtype, inner.dimension

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # the declared capabilities: the real backend's

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        if (batch.input_ids == 3).any():
            raise RuntimeError("injected fault: secret internal detail")
        return self.inner.forward(batch)


def test_backend_failure_fails_only_that_batch(server_factory: Any) -> None:
    with server_factory(max_batch_size=1) as s:
        engine = s.engines.default
        engine.model.backend = PoisonBackend(engine.model.backend)
        bodies: list[dict] = [{"inputs": f"healthy request {i}"} for i in range(6)]
        bodies.insert(3, {"inputs": [[101, 3, 102]]})
        responses = asyncio.run(fire(s.url, bodies))
        codes = [r.status_code for r in responses]
        assert codes == [200, 200, 200, 424, 200, 200, 200]
        err = responses[3].json()
        assert err["error_type"] == "Backend"
        assert "secret" not in err["error"] and "request id" in err["error"]
        assert responses[3].headers["x-request-id"] in err["error"]
        with s.client() as c:
            r = c.post("/v1/embeddings", json={"input": [[101, 3, 102]]})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert c.post("/embed", json={"inputs": "next one"}).status_code == 200


def test_metrics_and_timing_headers_move(server_factory: Any) -> None:
    with server_factory() as s, s.client() as c:
        r = c.post("/embed", json={"inputs": ["one", "two three"]})
        for h in ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
            assert float(r.headers[h]) >= 0
        assert int(r.headers["x-compute-tokens"]) == 3 + 4
        assert float(r.headers["x-total-time"]) >= float(r.headers["x-inference-time"])
        text = c.get("/metrics").text
    assert 'embedsvc_inputs_total{model="all-minilm-l6-v2"} 2.0' in text
    assert 'embedsvc_tokens_total{model="all-minilm-l6-v2"} 7.0' in text
    assert 'embedsvc_requests_total{model="all-minilm-l6-v2",route="/embed"} 1.0' in text
    assert (
        'embedsvc_request_duration_seconds_count{model="all-minilm-l6-v2",phase="total"} 1.0'
        in text
    )
    assert "embedsvc_queue_size" in text and "embedsvc_model_ready" in text


def test_unexpected_error_is_a_500_with_request_id_logged_once(
    server_factory: Any, caplog: Any, monkeypatch: Any
) -> None:
    """A bug in a route (injected: nothing else raises there on demand) answers an
    internal error (TEI's Backend error, 424 on its routes) with the request id in header
    and body, and its traceback is logged once, not twice."""
    from embedsvc.engine import ModelEngine

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("injected bug: secret internal detail")

    with server_factory() as s, s.client() as c:
        monkeypatch.setattr(ModelEngine, "decode", broken)
        caplog.clear()
        r = c.post("/decode", json={"ids": [101, 102]})
        assert r.status_code == 424 and r.json()["error_type"] == "Backend", r.text
        rid = r.headers["x-request-id"]
        assert rid in r.json()["error"] and "secret" not in r.json()["error"]
        assert c.post("/embed", json={"inputs": "next one"}).status_code == 200
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1, [rec.getMessage() for rec in tracebacks]
    assert rid in tracebacks[0].getMessage()
