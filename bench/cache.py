"""What the vector cache (--cache-bytes) saves on traffic that repeats itself, in one run.

    apt-get install wrk
    python bench/cache.py                  # about 3 minutes on 2 cores

Single-input /embed requests of the bundled MiniLM whose queries are drawn from a pool of
--pool distinct short queries with Zipf popularity (exponent --zipf), so a share of the
requests repeats an earlier one: at the defaults 44% of the stream, about the share of
repeated queries in public search logs. Two servers, one
without the cache and one with --cache-bytes, started once; wrk (one thread, 64
connections) takes turns on them for --rounds rounds. Each round prints requests/s of
both and the hit rate the cached server reported in /metrics during that round (the cache
warms over the rounds, as a server's does over its first minutes); last, the median ratio.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import cpu_description
from frontend import LUA, write_bodies, wrk
from throughput import free_port, start, stop
from workload import queries


def cache_counts(url: str) -> tuple[float, float]:
    """(hits, misses) from the server's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = dict(re.findall(r'embedsvc_cache_total\{[^}]*outcome="(\w+)"\} ([\d.e+]+)', text))
    return float(found.get("hit", 0)), float(found.get("miss", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pool", type=int, default=200_000, help="distinct queries")
    ap.add_argument("--zipf", type=float, default=0.8, help="popularity exponent")
    ap.add_argument("--requests", type=int, default=60_000, help="bodies wrk cycles through")
    ap.add_argument("--cache-bytes", type=int, default=64 << 20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/cache.py needs wrk: apt-get install wrk")
    print(f"CPU: {cpu_description()}", flush=True)
    pool = queries(args.pool, seed=5)
    rank = np.arange(1, args.pool + 1, dtype=np.float64)
    p = rank**-args.zipf
    picks = np.random.default_rng(9).choice(args.pool, size=args.requests, p=p / p.sum())
    texts = [pool[i] for i in picks]
    repeats = 1 - len(set(picks.tolist())) / len(picks)
    print(
        f"{args.requests} requests over {args.pool} queries (Zipf {args.zipf}): "
        f"{repeats:.0%} repeat an earlier one",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-cache-"))
    lua = tmp / "bodies.lua"
    lua.write_text(LUA)
    bodies = write_bodies(tmp, "zipf", texts, 1)
    servers = {}
    for name, extra in (("off", []), ("on", ["--cache-bytes", str(args.cache_bytes)])):
        port = free_port()
        cmd = [sys.executable, "-m", "embedsvc", "serve", "--port", str(port), *extra]
        servers[name] = (start([*cmd, "--log-level", "warning"], port), port)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for r in range(args.rounds):
            for name, (_, port) in servers.items():
                url = f"http://127.0.0.1:{port}"
                before = cache_counts(url)
                result = wrk(f"{url}/embed", bodies, lua, args.duration, 64)
                hits, misses = (a - b for a, b in zip(cache_counts(url), before, strict=True))
                rates[name].append(result["rps"])
                rate = f", hit rate {hits / max(hits + misses, 1):.0%}" if name == "on" else ""
                print(
                    f"round {r + 1} cache {name:3s} {result['rps']:8.1f} req/s "
                    f"(errors {result['errors']}){rate}",
                    flush=True,
                )
    finally:
        for proc, _ in servers.values():
            stop(proc)
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    print(
        f"cache on / off: {statistics.median(ratios):.2f}x requests/s (rounds "
        f"{min(ratios):.2f}-{max(ratios):.2f}); {args.cache_bytes} bytes per model"
    )


if __name__ == "__main__":
    main()
