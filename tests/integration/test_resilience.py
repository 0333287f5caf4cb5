"""Overload, faults and shutdown on real server processes and real servers in-process."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import httpx
import numpy as np
import pytest

from embedsvc.backends import Backend, BackendOutOfMemory, ForwardOutput, PaddedBatch
from tests.support import admitted_inputs, refused_after_signal, until

LONG = "the quick brown fox jumps over the lazy dog " * 25


async def burst(url: str, bodies: list[dict], deadline: float) -> list[int]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=deadline, limits=limits) as c:

        async def one(b: dict) -> int:
            try:
                return (await c.post("/embed", json=b)).status_code
            except httpx.TimeoutException:
                return -1

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.parametrize(
    ("args", "requests", "per_request", "metric"),
    [
        # admission by count: 160 inputs against a limit of 16 in flight
        (
            ("--max-concurrent-inputs", "16", "--max-batch-size", "8", "--max-queue-time", "0"),
            80,
            2,
            'embedsvc_refusals_total{model="all-minilm-l6-v2",reason="capacity"}',
        ),
        # admission by time: far more than the model serves within 2 s
        (
            ("--max-queue-time", "2"),
            40,
            16,
            'embedsvc_refusals_total{model="all-minilm-l6-v2",reason="queue_time"}',
        ),
    ],
)
def test_overload_burst_on_a_real_process(
    spawn: Any, args: tuple[str, ...], requests: int, per_request: int, metric: str
) -> None:
    """Every request of a burst far beyond capacity is answered 200 or 429 (none hangs),
    refusals are counted by reason, and the server serves normally right after."""
    srv = spawn(*args)
    bodies = [{"inputs": [f"{LONG} {i} {j}" for j in range(per_request)]} for i in range(requests)]
    t0 = time.monotonic()
    codes = asyncio.run(burst(srv.url, bodies, deadline=120))
    elapsed = time.monotonic() - t0
    assert -1 not in codes, "a request hung past the deadline"
    assert set(codes) <= {200, 429}
    assert codes.count(429) > 0 and codes.count(200) > 0
    r = httpx.post(srv.url + "/v1/embeddings", json={"input": "right after"}, timeout=30)
    assert r.status_code == 200
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'embedsvc_inflight_inputs{model="all-minilm-l6-v2"} 0.0' in metrics
    assert metric in metrics
    code, _ = srv.stop()
    assert code == 0
    print(f"burst: {codes.count(200)} ok, {codes.count(429)} refused in {elapsed:.1f}s")


def test_sigterm_drains_in_flight_requests(spawn: Any) -> None:
    srv = spawn("--max-batch-size", "4", "--drain-timeout", "60")

    async def scenario() -> tuple[list[Any], Any]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            inflight = [
                asyncio.create_task(c.post("/embed", json={"inputs": [LONG] * 4})) for _ in range(6)
            ]
            # All six admitted (24 long inputs in flight), then the signal.
            await until(lambda: admitted_inputs(srv.url) >= 24, what="24 inputs admitted")
            srv.proc.send_signal(signal.SIGTERM)
            late = await refused_after_signal(srv.url)
            return list(await asyncio.gather(*inflight)), late

    responses, late = asyncio.run(scenario())
    for r in responses:
        assert r.status_code == 200
        vecs = np.array(r.json())
        assert vecs.shape == (4, 384)
    assert late == "refused"  # new connections: 503 until the listener closes, then none
    code, out = srv.stop()
    assert code == 0, out
    assert "draining in-flight requests" in out


def test_drain_timeout_answers_503_and_exits_cleanly(spawn: Any) -> None:
    """SIGTERM with far more queued than the drain timeout allows: what finishes in time
    gets 200, the rest a 503 in its dialect's shape when the timeout passes (not a
    cancelled task's 500), and the process exits 0 without a traceback."""
    srv = spawn("--drain-timeout", "1", "--max-queue-time", "0")  # admit it all

    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            tei = [
                asyncio.create_task(
                    c.post("/embed", json={"inputs": [f"{LONG} {i} {j}" for j in range(16)]})
                )
                for i in range(10)
            ]
            openai = [
                asyncio.create_task(c.post("/v1/embeddings", json={"input": [f"{LONG} {i}"] * 16}))
                for i in range(10)
            ]
            # 320 long inputs admitted: tens of seconds of work.
            await until(lambda: admitted_inputs(srv.url) >= 320, what="320 inputs admitted")
            srv.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tei, *openai))

    t0 = time.monotonic()
    responses = asyncio.run(scenario())
    elapsed = time.monotonic() - t0
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 10
    for r in responses[:10]:
        if r.status_code == 503:
            assert r.json()["error_type"] == "Unhealthy"
            assert "drain timeout (1 s)" in r.json()["error"]
            assert r.headers["x-request-id"]
    for r in responses[10:]:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "service_unavailable"
            assert "drain timeout" in r.json()["error"]["message"]
    assert elapsed < 20
    code, out = srv.stop()
    assert code == 0, out
    assert "Traceback" not in out and "Cancel" not in out, out
    assert "answered 503" in out


def test_json_logs_carry_request_ids_and_no_secrets(spawn: Any) -> None:
    srv = spawn(
        "--log-format", "json", "--api-key", "s3cret-key", env={"HF_TOKEN": "hf_not_for_logs"}
    )
    h = {"authorization": "Bearer s3cret-key", "x-request-id": "req-42"}
    assert httpx.post(srv.url + "/embed", json={"inputs": "a"}, headers=h).status_code == 200
    assert (
        httpx.post(
            srv.url + "/embed", json={"inputs": "a"}, headers={"authorization": "Bearer wrong-key"}
        ).status_code
        == 401
    )
    code, out = srv.stop()
    assert code == 0
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any("listening on" in r["msg"] for r in records)
    assert "s3cret-key" not in out and "wrong-key" not in out and "hf_not_for_logs" not in out


class FaultyBackend:
    """Wraps the real backend to raise on demand. A fake, because a real model cannot be
    made to run out of memory or kill its worker on request."""

    def __init__(self, inner: Backend, fault: BaseException, when: Any) -> None:
        self.inner, self.fault, self.when = inner, fault, when
        self.device, self.dtype, self.dimension = inner.device, inner.dtype, inner.dimension
        self.shapes: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # the declared capabilities: the real backend's

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        self.shapes.append(batch.shape)
        if self.when(batch):
            raise self.fault
        return self.inner.forward(batch)


def test_out_of_memory_splits_the_batch(server_factory: Any, st_minilm: Any) -> None:
    texts = [f"sentence number {i} about the sea" for i in range(8)]
    with server_factory(max_batch_size=8) as s:
        engine = s.engines.default
        fake = FaultyBackend(
            engine.model.backend,
            BackendOutOfMemory("CUDA out of memory"),
            when=lambda b: b.shape[0] > 2,
        )
        engine.model.backend = fake
        with s.client() as c:
            r = c.post("/embed", json={"inputs": texts})
        assert r.status_code == 200
        expected = st_minilm.encode(texts, normalize_embeddings=True)
        np.testing.assert_allclose(np.array(r.json()), expected, atol=1e-4)
        assert [b for b, _ in fake.shapes] == [8, 4, 2, 2, 4, 2, 2]


class WorkerKilled(BaseException):
    """Something a worker cannot recover from (not an ordinary Exception)."""


def test_dead_worker_turns_health_red_and_asks_to_exit(server_factory: Any) -> None:
    with server_factory() as s:
        engine = s.engines.default
        reasons: list[str] = []
        engine.worker.on_fatal = reasons.append
        engine.model.backend = FaultyBackend(
            engine.model.backend, WorkerKilled(), when=lambda b: True
        )
        with s.client() as c:
            r = c.post("/embed", json={"inputs": "boom"})
            assert r.status_code == 424 and r.json()["error_type"] == "Backend"
            deadline = time.monotonic() + 10
            while not reasons and time.monotonic() < deadline:
                time.sleep(0.05)
            assert reasons == ["model all-minilm-l6-v2: a worker thread died"]
            health = c.get("/health")
            assert health.status_code == 503 and "not healthy" in health.json()["error"]
            r = c.post("/v1/embeddings", json={"input": "after"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"


def test_forward_passes_failing_in_a_row_turn_health_red(server_factory: Any) -> None:
    """A device that fails every forward pass (a sticky CUDA error, injected: a real model
    cannot be made to fail on demand) turns /health 503 after MAX_FAILED_BATCHES passes
    in a row, and asks the server to exit; a lone failure between successes does not."""
    from embedsvc.engine.worker import MAX_FAILED_BATCHES

    with server_factory(max_batch_size=1) as s:
        engine = s.engines.default
        reasons: list[str] = []
        engine.worker.on_fatal = reasons.append
        healthy = engine.model.backend
        engine.model.backend = FaultyBackend(
            healthy, RuntimeError("CUDA error: sticky"), when=lambda b: True
        )
        with s.client() as c:
            for _ in range(MAX_FAILED_BATCHES - 1):
                assert c.post("/embed", json={"inputs": "x"}).status_code == 424
            assert c.get("/health").status_code == 200  # not yet
            engine.model.backend = healthy  # one success resets the count
            assert c.post("/embed", json={"inputs": "ok"}).status_code == 200
            engine.model.backend = FaultyBackend(
                healthy, RuntimeError("CUDA error: sticky"), when=lambda b: True
            )
            for _ in range(MAX_FAILED_BATCHES):
                assert c.post("/embed", json={"inputs": "x"}).status_code == 424
            assert c.get("/health").status_code == 503
            assert reasons == [
                f"model all-minilm-l6-v2: {MAX_FAILED_BATCHES} forward passes in a row failed"
            ]
            assert c.post("/embed", json={"inputs": "after"}).status_code == 503


def test_admission_by_time_refuses_at_once_and_drops_late_work(server_factory: Any) -> None:
    """With a backlog of long passages queued, a request whose estimated wait exceeds its
    limit (here the client's x-request-timeout) gets 429 with Retry-After at once (it
    arrives while the backlog is still running), counted by reason; a request admitted on
    a wrong estimate that then waits past its deadline is dropped with 429 before its
    forward pass; and the service answers normally afterwards."""
    from embedsvc.engine.admission import RateEstimate

    with server_factory(max_batch_size=4) as s:
        worker = s.engines.default.worker

        async def scenario() -> tuple[Any, Any, Any, Any]:
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                backlog = asyncio.create_task(
                    c.post("/embed", json={"inputs": [f"{LONG} {i}" for i in range(48)]})
                )
                while worker.tokens_ahead == 0:  # the backlog is queued
                    await asyncio.sleep(0.01)
                quick = await c.post(
                    "/v1/embeddings",
                    json={"input": "a query"},
                    headers={"x-request-timeout": "0.01"},
                )
                backlog_done_first = backlog.done()
                # An estimate that is far too optimistic admits a request the backlog
                # then keeps waiting past its 0.05 s deadline.
                worker.rate = RateEstimate(1e12)
                late = await c.post(
                    "/embed", json={"inputs": "late query"}, headers={"x-request-timeout": "0.05"}
                )
                return quick, backlog_done_first, late, await backlog

        quick, backlog_done_first, late, backlog = asyncio.run(scenario())
        assert quick.status_code == 429, quick.text
        assert not backlog_done_first
        assert int(quick.headers["retry-after"]) >= 1
        err = quick.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "limit of 0.01 s" in err["message"]
        assert late.status_code == 429, late.text
        assert "could not answer this request within its limit of 0.05 s" in late.json()["error"]
        assert backlog.status_code == 200 and len(backlog.json()) == 48
        with s.client() as c:
            assert c.post("/embed", json={"inputs": "right after"}).status_code == 200
            text = c.get("/metrics").text
            bad = c.post("/embed", json={"inputs": "x"}, headers={"x-request-timeout": "soon"})
            assert bad.status_code == 422 and "x-request-timeout" in bad.json()["error"]
        for reason in ("queue_time", "deadline"):
            line = f'embedsvc_refusals_total{{model="all-minilm-l6-v2",reason="{reason}"}}'
            assert f"{line} 1.0" in text, reason
        info = httpx.get(s.url + "/info").json()
        assert info["max_queue_time"] == 5.0 and info["models"][0]["queue_time_estimate"] == 0


def test_compute_thread_fault_while_forming_a_batch_leaves_nothing_hanging(
    server_factory: Any, monkeypatch: Any
) -> None:
    """The compute thread dies while padding the next batch (injected: nothing real fails
    there on demand), holding inputs already taken from the queue: every admitted request
    still ends, with its vectors or an error, and later ones get 503."""
    import threading

    from embedsvc.engine import worker as worker_module

    real_pad = worker_module.pad

    def pad(items: Any, pad_id: int) -> Any:
        if threading.current_thread().name == "embedsvc-compute":
            raise WorkerKilled()
        return real_pad(items, pad_id)

    with server_factory(max_batch_size=2) as s:
        reasons: list[str] = []
        s.engines.default.worker.on_fatal = reasons.append
        monkeypatch.setattr(worker_module, "pad", pad)

        async def scenario() -> list[int]:
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                rs = await asyncio.gather(
                    *(
                        c.post("/embed", json={"inputs": [f"{LONG} {i} {j}" for j in range(4)]})
                        for i in range(6)
                    )
                )
                return [r.status_code for r in rs]

        codes = asyncio.run(scenario())  # a hung request would raise a timeout here
        assert set(codes) <= {200, 424, 503} and 424 in codes, codes
        assert reasons == ["model all-minilm-l6-v2: a worker thread died"]
        with s.client() as c:
            assert c.get("/health").status_code == 503
            assert c.post("/embed", json={"inputs": "after"}).status_code == 503
