"""Concurrent requests share forward passes, and each caller gets its own vectors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np

from tests.support import Server, cosine


def sentences(n: int) -> list[str]:
    topics = ["rivers", "compilers", "bread", "volcanoes", "chess", "jazz", "tides", "moss"]
    return [
        f"Question {i}: what is known about {topics[i % len(topics)]} in year {1900 + i}?"
        for i in range(n)
    ]


async def fire(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        return await asyncio.gather(*(c.post("/embed", json=b) for b in bodies))


def test_concurrent_requests_share_forward_passes(server: Server, st_minilm: Any) -> None:
    texts = sentences(48)
    expected = st_minilm.encode(texts, normalize_embeddings=True)
    before = server.metric("embedsvc_batches_total", model="all-minilm-l6-v2")
    before_inputs = server.metric("embedsvc_batch_size_sum", model="all-minilm-l6-v2")
    responses = asyncio.run(fire(server.url, [{"inputs": t} for t in texts]))
    batches = server.metric("embedsvc_batches_total", model="all-minilm-l6-v2") - before
    inputs = server.metric("embedsvc_batch_size_sum", model="all-minilm-l6-v2") - before_inputs
    assert all(r.status_code == 200 for r in responses)
    assert inputs == 48
    # 48 single-input requests at once must not become 48 forward passes.
    assert batches < 48 / 2, f"{batches} forward passes for 48 concurrent requests"
    for r, e in zip(responses, expected, strict=True):
        got = np.array(r.json()[0])
        assert cosine(got, e) >= 0.9999  # each caller gets its own vector back


def test_mixed_models_and_options_in_flight(server: Server) -> None:
    bodies = []
    for i in range(30):
        if i % 3 == 0:
            bodies.append(
                {"inputs": [f"text {i}", f"more {i}"], "model": "tiny-nomic", "dimensions": 8}
            )
        elif i % 3 == 1:
            bodies.append({"inputs": f"query {i}", "model": "tiny-bge", "prompt_name": "query"})
        else:
            bodies.append({"inputs": f"plain {i}", "normalize": False})
    responses = asyncio.run(fire(server.url, bodies))
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        vecs = np.array(r.json())
        assert vecs.shape[0] == (2 if isinstance(body["inputs"], list) else 1)
        width = {"tiny-nomic": 8, "tiny-bge": 32}.get(str(body.get("model")), 384)
        assert vecs.shape[1] == width
    # Alone, each request gives the same vectors as it did among the others.
    with server.client() as c:
        for body, r in list(zip(bodies, responses, strict=True))[:6]:
            alone = np.array(c.post("/embed", json=body).json())
            for a, b in zip(alone, np.array(r.json()), strict=True):
                assert cosine(a, b) >= 0.99999
