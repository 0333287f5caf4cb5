"""A burst far beyond capacity: admission by time against admission by count alone.

    python bench/overload.py                   # bundled MiniLM, 300 x 32 inputs, ~3 minutes
    python bench/overload.py --requests 100

Two servers, started one after the other on the same model: `--max-queue-time 5` (the
default: refuse when the estimated wait passes 5 s) and `--max-queue-time 0` (only the
input-count limit, as before). Each gets --requests requests of 32 RAG-mix inputs at once
(short queries and passages of 30-290 words), from clients that give up after
--client-timeout seconds, and then one more request. Printed per server: how many were
answered 200, 429 or not at all, p50/p99/max latency of the 200s and of the 429s, and the
latency of the request sent right after the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Load, free_port, pct, start, stop
from workload import rag_mix


async def burst(url: str, load: Load, n: int, client_timeout: float) -> dict:
    bodies = [load.body() for _ in range(n)]
    timeout = aiohttp.ClientTimeout(total=client_timeout)
    out: dict[str, list[float]] = {"200": [], "429": [], "other": [], "timeout": []}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=conn, timeout=timeout) as session:

        async def one(body: dict) -> None:
            t0 = time.perf_counter()
            try:
                async with session.post("/embed", json=body) as r:
                    await r.read()
                    key = str(r.status) if r.status in (200, 429) else "other"
            except (TimeoutError, aiohttp.ClientError):
                key = "timeout"
            out[key].append(time.perf_counter() - t0)

        await asyncio.gather(*(one(b) for b in bodies))
        t0 = time.perf_counter()
        async with session.post("/embed", json={"inputs": "right after the burst"}) as r:
            await r.read()
            after = (r.status, (time.perf_counter() - t0) * 1000)
    return {"lat": out, "after": after}


def show(label: str, r: dict) -> None:
    lat = r["lat"]
    counts = ", ".join(f"{len(v)} {k}" for k, v in lat.items() if v)
    print(f"{label}: {counts}")
    for key in ("200", "429"):
        xs = lat[key]
        if xs:
            print(
                f"    {key}: p50 {pct(xs, 50) / 1000:6.2f} s  p99 {pct(xs, 99) / 1000:6.2f} s  "
                f"max {max(xs):6.2f} s"
            )
    status, ms = r["after"]
    print(f"    right after the burst: {status} in {ms:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--client-timeout", type=float, default=45.0)
    args = ap.parse_args()

    texts = rag_mix(3000, seed=13, passage_words=(30, 290))
    for queue_time in ("5", "0"):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "embedsvc",
            "serve",
            "--port",
            str(port),
            "--models",
            args.model,
            "--max-queue-time",
            queue_time,
            "--log-level",
            "warning",
        ]
        proc = start(cmd, port)
        try:
            r = asyncio.run(
                burst(
                    f"http://127.0.0.1:{port}", Load(texts, 32), args.requests, args.client_timeout
                )
            )
        finally:
            stop(proc)
        show(f"--max-queue-time {queue_time}, {args.requests} x 32 inputs at once", r)


if __name__ == "__main__":
    main()
