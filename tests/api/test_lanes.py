"""Forward passes side by side on a CPU (engine/compute.py, Lanes): under a backlog each
pass runs on its share of the cores, a lone pass on all of them, and every caller still
gets its own vectors."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import numpy as np

from embedsvc.engine.compute import ComputeThread, Lanes
from tests.support import cosine


def test_lanes_share_the_cores_and_route_around_a_busy_lane() -> None:
    lanes = Lanes(2, 2, ComputeThread("test-lane-0"))
    ran: list[tuple[int, int]] = []
    done = threading.Event()

    def pass_(lane: int, backlog: bool) -> None:
        ran.append((lane, lanes.take(lane, backlog)))
        done.set()

    # A lone batch with nothing queued behind it: lane 0, every core.
    lanes.submit(lambda lane: pass_(lane, backlog=False))
    assert done.wait(5) and ran == [(0, 2)]
    done.clear()
    # Lane 0 is in its pass: the next batch goes to lane 1 and waits there for a core.
    lanes.submit(lambda lane: pass_(lane, backlog=True))
    assert not done.wait(0.3)
    lanes.give(0, 2)
    assert done.wait(5) and ran[-1] == (1, 1)
    # Under a backlog lane 0 takes its share and leaves the other core to lane 1.
    assert lanes.take(0, backlog=True) == 1
    assert lanes.most_at_once == 2
    lanes.give(0, 1)
    lanes.give(1, 1)


async def fire(url: str, texts: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        return await asyncio.gather(*(c.post("/embed", json={"inputs": t}) for t in texts))


def test_passes_run_side_by_side_under_load_and_alone_on_every_core(
    server_factory: Any, st_minilm: Any
) -> None:
    texts = [
        f"Passage {i}: "
        + " ".join(["tides", "moss", "granite", "jazz", "bread"][: 1 + i % 5]) * (1 + i % 7)
        for i in range(96)
    ]
    with server_factory(threads=2) as s:
        lanes = s.engines.get(None).worker.lanes
        assert lanes is not None and len(lanes.threads) == 2 and lanes.per_lane == 1
        lanes.most_at_once = 0  # the lanes are the process's: earlier tests used them too
        responses = asyncio.run(fire(s.url, texts))
        assert all(r.status_code == 200 for r in responses)
        assert lanes.most_at_once == 2  # two passes ran at once, one core each
        expected = st_minilm.encode(texts, normalize_embeddings=True)
        for r, e in zip(responses, expected, strict=True):
            assert cosine(np.array(r.json()[0]), e) >= 0.9999
        # A lone request afterwards gets both cores, on lane 0.
        lanes.set_threads[0] = 0  # forget what the burst left; the pass sets it again
        with s.client() as c:
            assert c.post("/embed", json={"inputs": "a lone query"}).status_code == 200
        assert lanes.set_threads[0] == 2
