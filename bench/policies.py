"""Batch policies under a backlog: latency of 32-input requests, and throughput.

    python bench/policies.py                  # bundled MiniLM, about 4 minutes
    python bench/policies.py --clients 24 --rounds 3

One server per `--batch-policy` (arrival, length), started once each; the policies take
turns for --rounds rounds. Each turn
  - sends a burst of --burst 32-input RAG-mix requests at once (short queries and passages
    of 30-290 words) and reports when they finish: p50/p99 and the time the last one took
    (the backlog's drain time);
  - keeps --clients closed-loop clients sending such requests, far more than the model
    serves (a steady overload: the queue never empties), and reports inputs/s and p50/p99.
With "length" a backlog spreads every request over many batches, so most requests finish
near the end of it; "arrival" fills batches from the oldest requests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Load, closed_loop, free_port, pct, start, stop
from workload import rag_mix

POLICIES = ("arrival", "length")


async def burst(url: str, load: Load, n: int) -> dict:
    """`n` requests at once; when each one finishes."""
    bodies = [load.body() for _ in range(n)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=conn) as session:
        t0 = time.perf_counter()

        async def one(body: dict) -> float:
            async with session.post("/embed", json=body) as r:
                await r.read()
                assert r.status == 200, r.status
            return time.perf_counter() - t0

        done = await asyncio.gather(*(one(b) for b in bodies))
    return {"p50_ms": pct(done, 50), "p99_ms": pct(done, 99), "last_ms": max(done) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per turn")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--burst", type=int, default=20, help="requests in the burst")
    args = ap.parse_args()

    texts = rag_mix(3000, seed=9, passage_words=(30, 290))
    servers = {}
    try:
        for policy in POLICIES:
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
                "--batch-policy",
                policy,
                "--log-level",
                "warning",
            ]
            servers[policy] = (start(cmd, port), f"http://127.0.0.1:{port}")
        results: dict[str, list[dict]] = {p: [] for p in POLICIES}
        bursts: dict[str, list[dict]] = {p: [] for p in POLICIES}
        for r in range(args.rounds):
            for policy in POLICIES:
                url = servers[policy][1]
                b = asyncio.run(burst(url, Load(texts, 32, seed=100 + r), args.burst))
                bursts[policy].append(b)
                print(
                    f"  round {r + 1} {policy:8s}: burst of {args.burst}: p50 "
                    f"{b['p50_ms'] / 1000:5.2f} s  p99 {b['p99_ms'] / 1000:5.2f} s  last "
                    f"{b['last_ms'] / 1000:5.2f} s",
                    flush=True,
                )
                asyncio.run(closed_loop(url, Load(texts, 32, seed=r), args.clients, 5))  # warm
                res = asyncio.run(
                    closed_loop(url, Load(texts, 32, seed=r), args.clients, args.duration)
                )
                results[policy].append(res)
                print(
                    f"  round {r + 1} {policy:8s}: {res['inputs_per_s']:6.1f} inputs/s  "
                    f"p50 {res['p50_ms'] / 1000:5.2f} s  p99 {res['p99_ms'] / 1000:5.2f} s  "
                    f"errors {res['errors']}",
                    flush=True,
                )
    finally:
        for proc, _ in servers.values():
            stop(proc)
    print()
    keys = ("inputs_per_s", "p50_ms", "p99_ms")
    med = {p: {k: statistics.median(x[k] for x in results[p]) for k in keys} for p in POLICIES}
    for p in POLICIES:
        m = med[p]
        print(
            f"{p:8s} (median of rounds): {m['inputs_per_s']:6.1f} inputs/s  "
            f"p50 {m['p50_ms'] / 1000:5.2f} s  p99 {m['p99_ms'] / 1000:5.2f} s"
        )
    for p in POLICIES:
        m = {k: statistics.median(x[k] for x in bursts[p]) for k in ("p50_ms", "p99_ms", "last_ms")}
        print(
            f"{p:8s} burst of {args.burst} (median of rounds): p50 {m['p50_ms'] / 1000:5.2f} s  "
            f"p99 {m['p99_ms'] / 1000:5.2f} s  last {m['last_ms'] / 1000:5.2f} s"
        )
    a, b = med["arrival"], med["length"]
    print(
        f"arrival / length, overload: throughput {a['inputs_per_s'] / b['inputs_per_s']:.2f}, "
        f"p50 {a['p50_ms'] / b['p50_ms']:.2f}, p99 {a['p99_ms'] / b['p99_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
