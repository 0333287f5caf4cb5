"""Soak: steady traffic of varied lengths for a long time; does memory or latency drift?

    python bench/soak.py                          # 30 minutes, bundled MiniLM
    python bench/soak.py --minutes 10 --env EMBEDSVC_MALLOC=system   # glibc as it comes
    python bench/soak.py --saturation-only --probe 30 --env LD_PRELOAD=$JEMALLOC   # speed

Starts `embedsvc serve` (the real CLI), measures its saturation with 16 closed-loop
clients for --probe seconds, then sends single-input RAG-mix requests (short queries and
passages of 30-290 words: many batch shapes) at --fraction of that rate, open loop
(Poisson arrivals), for --minutes. It prints the server's RSS (all its processes) every
--sample seconds, and per --window: requests answered, throughput, p50/p99 latency and
errors. The summary gives RSS growth after the first window (peak of the last window
against the peak of the first) and the last window's throughput and p99 against the
first's.

The load generator is this process (aiohttp); at a fraction of a CPU model's saturation
it sends tens of requests a second, and its own CPU time is printed to show it is not the
limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Load, closed_loop, free_port, pct, start, stop
from workload import rag_mix


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its children, MB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


async def soak(url: str, pid: int, load: Load, rate: float, args: argparse.Namespace) -> dict:
    rng = random.Random(11)
    windows: list[dict] = []
    rss: list[tuple[float, float]] = []
    current: dict = {"lat": [], "errors": {}}
    conn = aiohttp.TCPConnector(limit=0)
    t_start = time.perf_counter()
    end = t_start + args.minutes * 60

    async with aiohttp.ClientSession(url, connector=conn) as session:

        async def one(window: dict) -> None:
            t0 = time.perf_counter()
            try:
                async with session.post("/embed", json=load.body()) as r:
                    await r.read()
                    outcome = str(r.status)
            except aiohttp.ClientError as e:
                outcome = type(e).__name__
            if outcome == "200":
                window["lat"].append(time.perf_counter() - t0)
            else:
                window["errors"][outcome] = window["errors"].get(outcome, 0) + 1

        async def sampler() -> None:
            while True:
                t = time.perf_counter() - t_start
                rss.append((t, rss_mb(pid)))
                print(f"  t={t / 60:5.1f} min  RSS {rss[-1][1]:7.1f} MB", flush=True)
                await asyncio.sleep(args.sample)

        def close_window(w: dict, seconds: float) -> None:
            w["rps"] = len(w["lat"]) / seconds
            w["p50"], w["p99"] = pct(w["lat"], 50), pct(w["lat"], 99)
            windows.append(w)
            print(
                f"  window {len(windows)}: {len(w['lat'])} requests, {w['rps']:.1f} req/s, "
                f"p50 {w['p50']:.0f} ms, p99 {w['p99']:.0f} ms, errors {w['errors'] or 0}",
                flush=True,
            )

        sample_task = asyncio.create_task(sampler())
        tasks: set[asyncio.Task] = set()
        next_at = window_start = time.perf_counter()
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if next_at - window_start >= args.window:
                # Requests still running finish into the window they started in.
                close_window(current, args.window)
                current = {"lat": [], "errors": {}}
                window_start += args.window
            task = asyncio.create_task(one(current))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        close_window(current, max(end - window_start, 1e-9))
        rss.append((time.perf_counter() - t_start, rss_mb(pid)))
        sample_task.cancel()
    return {"windows": windows, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fraction", type=float, default=0.6, help="of the measured saturation")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (skips the probe)")
    ap.add_argument("--probe", type=float, default=20.0, help="seconds to measure saturation")
    ap.add_argument("--window", type=float, default=300.0, help="seconds per latency window")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--models-file", default="")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    ap.add_argument(
        "--saturation-only",
        action="store_true",
        help="measure saturation (--probe seconds), print it and RSS, and stop",
    )
    ap.add_argument("serve_args", nargs="*", help="more `embedsvc serve` arguments (after --)")
    args = ap.parse_args()

    texts = rag_mix(4000, seed=5, passage_words=(30, 290))
    load = Load(texts, 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "serve",
        "--port",
        str(port),
        "--models",
        args.model,
        "--log-level",
        "warning",
        *args.serve_args,
    ]
    if args.models_file:
        cmd += ["--models-file", args.models_file]
    for kv in args.env:
        key, _, value = kv.partition("=")
        os.environ[key] = value  # start() passes this process's environment on
    proc = start(cmd, port)
    try:
        print(f"server pid {proc.pid}: {' '.join(cmd[2:])} {' '.join(args.env)}")
        print(f"RSS after start: {rss_mb(proc.pid):.1f} MB")
        rate = args.rate
        if not rate:
            sat = asyncio.run(closed_loop(url, load, 16, args.probe))
            rate = sat["requests_per_s"] * args.fraction
            print(
                f"saturation {sat['requests_per_s']:.1f} req/s (16 clients, {args.probe:.0f} s); "
                f"soak at {rate:.1f} req/s"
            )
        if args.saturation_only:
            print(f"RSS after the probe: {rss_mb(proc.pid):.1f} MB")
            return
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        r = asyncio.run(soak(url, proc.pid, load, rate, args))
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        stop(proc)
    w, rss = r["windows"], r["rss"]
    client = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    first = [m for t, m in rss if t <= args.window]
    last = [m for t, m in rss if t >= rss[-1][0] - args.window]
    print()
    print(
        f"load generator CPU: {client:.1f} s over {args.minutes:.0f} min "
        f"({client / (args.minutes * 60) * 100:.1f}% of a core)"
    )
    # Peaks, not single samples: a trimmed heap swings by tens of MB between samples.
    print(
        f"RSS: start {rss[0][1]:.1f} MB, peak in the first window {max(first):.1f} MB, "
        f"peak in the last window {max(last):.1f} MB: growth after the first window "
        f"{(max(last) / max(first) - 1) * 100:+.1f}%"
    )
    if len(w) > 1:
        print(
            f"last window / first: throughput {w[-1]['rps'] / w[0]['rps']:.2f}, "
            f"p99 {w[-1]['p99'] / w[0]['p99']:.2f}"
        )


if __name__ == "__main__":
    main()
