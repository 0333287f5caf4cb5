"""Several front-end processes beside one engine process (--api-workers 2), on real server
processes: real clients, a front end killed under load, draining, metrics across processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support import (
    admitted_inputs,
    cosine,
    metric_value,
    refused_after_signal,
    until,
    wait_for,
)

TEXTS = ["What is the capital of France?", "Paris is the capital of France."]
LONG = "the quick brown fox jumps over the lazy dog " * 25


def frontends(pid: int) -> list[int]:
    """The front-end processes among a server's children (not multiprocessing helpers)."""
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmd:
            out.append(int(child))
    return sorted(out)


def test_real_clients_through_several_front_ends(spawn: Any, st_minilm: Any) -> None:
    import openai
    from huggingface_hub import InferenceClient

    srv = spawn("--api-workers", "2", "--api-key", "k3y", "--max-input-chars", "50")
    assert len(frontends(srv.proc.pid)) == 2
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k3y")
    expected = st_minilm.encode(TEXTS, normalize_embeddings=True)
    for _ in range(4):  # new connections: both front ends get some
        res = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS)
        for d, e in zip(res.data, expected, strict=True):
            assert cosine(d.embedding, e) >= 0.9999
    hf = InferenceClient(model=srv.url, token="k3y")
    got = np.asarray(hf.feature_extraction(TEXTS[0]))
    assert got.shape == (1, 384) and cosine(got[0], expected[0]) >= 0.9999
    auth = {"authorization": "Bearer k3y"}
    for _ in range(4):  # keys and limits hold in every front end
        assert httpx.post(srv.url + "/embed", json={"inputs": "x"}).status_code == 401
        long = httpx.post(srv.url + "/embed", json={"inputs": "y" * 51}, headers=auth)
        assert long.status_code == 422 and "max_input_chars" in long.json()["error"]
    assert httpx.get(srv.url + "/health").status_code == 200
    info = httpx.get(srv.url + "/info", headers=auth).json()
    assert info["models"][0]["dimension"] == 384 and info["models"][0]["ready"]
    code, _ = srv.stop()
    assert code == 0


def test_metrics_are_summed_across_front_ends(spawn: Any) -> None:
    srv = spawn("--api-workers", "2")
    prefixes = set()
    sent = 0
    # A connection each: the kernel hands each to whichever front end accepts first, so
    # go on until both have served some (the request ids carry a per-process prefix).
    while len(prefixes) < 2 and sent < 300:
        r = httpx.post(srv.url + "/embed", json={"inputs": [f"text {sent}", "two"]})
        assert r.status_code == 200
        prefixes.add(r.headers["x-request-id"][:16])
        sent += 1
    assert len(prefixes) == 2, "one front end served every request"
    text = httpx.get(srv.url + "/metrics").text
    route = 'embedsvc_requests_total{model="all-minilm-l6-v2",route="/embed"}'
    assert metric_value(text, route) == sent
    assert metric_value(text, 'embedsvc_inputs_total{model="all-minilm-l6-v2"}') == 2 * sent
    assert metric_value(text, 'embedsvc_inflight_inputs{model="all-minilm-l6-v2"}') == 0
    assert metric_value(text, 'embedsvc_model_ready{model="all-minilm-l6-v2"}') == 1
    srv.stop()


def test_front_end_killed_under_load_hangs_nothing_and_is_replaced(spawn: Any) -> None:
    srv = spawn("--api-workers", "2", "--max-batch-size", "4", "--max-queue-time", "0")
    before = frontends(srv.proc.pid)

    async def scenario() -> list[Any]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:

            async def one(i: int) -> Any:
                try:
                    r = await c.post("/embed", json={"inputs": [LONG, f"query {i}"]})
                    return r.status_code
                except httpx.TimeoutException:
                    return "hung"
                except httpx.TransportError:
                    return "reset"  # its front end died: the connection closes, no hang

            tasks = [asyncio.create_task(one(i)) for i in range(40)]
            await until(lambda: admitted_inputs(srv.url) >= 80, what="80 inputs admitted")
            os.kill(before[0], signal.SIGKILL)
            return list(await asyncio.gather(*tasks))

    outcomes = asyncio.run(scenario())
    assert "hung" not in outcomes
    assert set(outcomes) <= {200, "reset"} and outcomes.count(200) > 0
    wait_for(lambda: len(frontends(srv.proc.pid)) == 2)
    assert frontends(srv.proc.pid) != before
    wait_for(lambda: httpx.get(srv.url + "/health").status_code == 200)
    for i in range(6):
        assert httpx.post(srv.url + "/embed", json={"inputs": f"after {i}"}).status_code == 200
    text = httpx.get(srv.url + "/metrics").text
    assert metric_value(text, 'embedsvc_inflight_inputs{model="all-minilm-l6-v2"}') == 0
    code, out = srv.stop()
    assert code == 0
    assert "exited with -9" in out


def test_sigterm_drains_every_front_end(spawn: Any) -> None:
    srv = spawn(
        "--api-workers",
        "2",
        "--max-batch-size",
        "4",
        "--drain-timeout",
        "60",
        "--max-queue-time",
        "0",
    )

    async def scenario() -> tuple[list[Any], Any]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as c:
            inflight = [
                asyncio.create_task(c.post("/embed", json={"inputs": [LONG] * 4})) for _ in range(8)
            ]
            await until(lambda: admitted_inputs(srv.url) >= 32, what="32 inputs admitted")
            srv.proc.send_signal(signal.SIGTERM)
            late = await refused_after_signal(srv.url)
            return list(await asyncio.gather(*inflight)), late

    responses, late = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 8, [r.text[:200] for r in responses]
    assert all(np.array(r.json()).shape == (4, 384) for r in responses)
    assert late == "refused"  # new connections: 503 until the listeners close, then none
    code, out = srv.stop()
    assert code == 0, out
    assert "front ends drain their requests" in out


def test_engine_process_killed_answers_in_flight_and_front_ends_exit(spawn: Any) -> None:
    srv = spawn(
        "--api-workers",
        "2",
        "--max-batch-size",
        "4",
        "--drain-timeout",
        "60",
        "--max-queue-time",
        "0",
    )
    fronts = frontends(srv.proc.pid)

    async def scenario() -> tuple[list[Any], float]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=srv.url, timeout=50, limits=limits) as c:

            async def one() -> Any:
                try:
                    return (await c.post("/embed", json={"inputs": [LONG] * 8})).status_code
                except httpx.TimeoutException:
                    return "hung"
                except httpx.TransportError:
                    return "closed"

            tasks = [asyncio.create_task(one()) for _ in range(16)]
            await until(lambda: admitted_inputs(srv.url) >= 128, what="128 inputs admitted")
            t0 = time.monotonic()
            srv.proc.kill()  # the engine (and supervisor) dies at once
            out = list(await asyncio.gather(*tasks))
            return out, time.monotonic() - t0

    outcomes, took = asyncio.run(scenario())
    assert "hung" not in outcomes and set(outcomes) <= {200, 503, "closed"}, outcomes
    assert took < 20, f"in-flight requests waited {took:.0f} s for an engine that was gone"
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in fronts), timeout=30)


def test_admission_by_time_across_front_ends(spawn: Any) -> None:
    """The front ends decide on the engine's reported rate and backlog: a burst beyond
    --max-queue-time gets 200s and 429s (with Retry-After), none hangs."""
    srv = spawn("--api-workers", "2", "--max-queue-time", "1")

    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=30)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            return list(
                await asyncio.gather(
                    *(
                        c.post("/embed", json={"inputs": [f"{LONG} {i} {j}" for j in range(16)]})
                        for i in range(30)
                    )
                )
            )

    responses = asyncio.run(scenario())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
    assert httpx.post(srv.url + "/embed", json={"inputs": "after"}).status_code == 200
    code, _ = srv.stop()
    assert code == 0


def test_a_hung_engine_turns_health_red_and_fails_requests_then_recovers(spawn: Any) -> None:
    """The engine process stopped (SIGSTOP: alive, silent) rather than dead: within a few
    seconds /health is 503 and a request gets a 503 instead of hanging; after SIGCONT the
    front ends hear it again and serve."""
    srv = spawn("--api-workers", "2")
    engine = srv.proc.pid
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/embed", json={"inputs": "before"}).status_code == 200
        os.kill(engine, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            r = c.post("/embed", json={"inputs": "while it hangs"})
            assert r.status_code == 503, r.text
            assert r.json()["error_type"] == "Unhealthy"
            assert time.monotonic() - stopped < 15
            wait_for(lambda: c.get("/health").status_code == 503, timeout=15)
            r = c.post("/v1/embeddings", json={"input": "refused at once"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        finally:
            os.kill(engine, signal.SIGCONT)
        wait_for(lambda: c.get("/health").status_code == 200, timeout=30)
        wait_for(lambda: all(_health_ok(srv.url) for _ in range(4)), timeout=30)
        assert c.post("/embed", json={"inputs": "after"}).status_code == 200


def _health_ok(url: str) -> bool:
    """/health on a new connection (another front end, maybe)."""
    with httpx.Client(base_url=url, timeout=5) as c:
        return c.get("/health").status_code == 200
