"""The mechanism that keeps memory flat is active in the served process (docs/benchmarks.md,
"Memory under a soak", has the measurements; no timing is asserted here)."""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedsvc.memory import YOUNG_GENERATION, settle_gc

JEMALLOC = [
    p
    for p in Path("/usr/lib").glob("*-linux-gnu/libjemalloc.so.2")
    if p.exists()  # Debian/Ubuntu package libjemalloc2 (the Docker image installs it)
]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def embed_some(url: str) -> None:
    for n in (1, 7, 30):
        r = httpx.post(url + "/embed", json={"inputs": ["word " * (5 * n + k) for k in range(n)]})
        assert r.status_code == 200


def test_glibc_heap_is_trimmed_when_the_queue_drains(spawn: Any) -> None:
    srv = spawn()
    assert httpx.get(srv.url + "/info").json()["allocator"] == "glibc+trim"
    embed_some(srv.url)
    time.sleep(1.2)  # trimming waits at least a second between two trims
    embed_some(srv.url)
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "embedsvc_malloc_trims_total") >= 1
    # Operators can alert on memory: the process collector and the whole server's RSS.
    assert metric(text, "process_resident_memory_bytes") > 100e6
    assert metric(text, "embedsvc_server_resident_memory_bytes") > 100e6
    code, _ = srv.stop()
    assert code == 0


def test_malloc_system_leaves_glibc_alone(spawn: Any) -> None:
    srv = spawn("--malloc", "system")
    assert httpx.get(srv.url + "/info").json()["allocator"] == "glibc"
    embed_some(srv.url)
    time.sleep(1.2)
    embed_some(srv.url)
    assert metric(httpx.get(srv.url + "/metrics").text, "embedsvc_malloc_trims_total") == 0


@pytest.mark.skipif(not JEMALLOC, reason="libjemalloc2 is not installed on this machine")
def test_preloaded_jemalloc_is_what_the_server_allocates_with(spawn: Any) -> None:
    srv = spawn(env={"LD_PRELOAD": str(JEMALLOC[0])})
    assert httpx.get(srv.url + "/info").json()["allocator"] == "jemalloc"
    assert "libjemalloc" in Path(f"/proc/{srv.proc.pid}/maps").read_text()
    embed_some(srv.url)
    time.sleep(1.2)
    embed_some(srv.url)
    assert metric(httpx.get(srv.url + "/metrics").text, "embedsvc_malloc_trims_total") == 0


def test_settle_gc_freezes_what_is_loaded_and_widens_the_young_generation() -> None:
    before = gc.get_threshold()
    runs: list[int] = []
    gc.callbacks.append(lambda phase, info: runs.append(info["generation"]))
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0  # this process's objects so far: out of the collector
        assert gc.get_threshold() == (YOUNG_GENERATION, *before[1:])
        runs.clear()
        made = [[i] for i in range(YOUNG_GENERATION // 2)]  # young objects that stay alive
        assert len(made) > 700 and runs == []  # 700: the default would have collected
    finally:
        gc.callbacks.pop()
        gc.unfreeze()
        gc.set_threshold(*before)
