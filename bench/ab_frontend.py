"""Single-input requests through two embedsvc source trees, side by side in one run: this
checkout and --baseline (another checkout of the project, for example an earlier commit
made with `git worktree add`), both serving the bundled MiniLM from this environment.

    apt-get install wrk
    git worktree add /tmp/embedsvc-base <commit>
    python bench/ab_frontend.py --baseline /tmp/embedsvc-base     # about 3 minutes

Both servers start once; wrk (one thread, 64 connections, single-input /embed bodies: the
RAG mix and short queries of bench/frontend.py) takes turns on them for --rounds rounds, so
a slow minute of a shared machine hits both alike. Prints each round's requests/s and,
per workload, the median ratio (this checkout / baseline) with the rounds' range.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from frontend import LUA, write_bodies, wrk
from throughput import free_port, start, stop
from workload import queries, rag_mix

HERE = Path(__file__).resolve().parent.parent


def server(tree: Path, port: int) -> object:
    """`embedsvc serve` with the package of `tree` first on the path (`-m` puts the
    working folder there, ahead of the editable install)."""
    here = os.getcwd()
    os.chdir(tree)
    try:
        cmd = [sys.executable, "-m", "embedsvc", "serve", "--port", str(port)]
        return start([*cmd, "--log-level", "warning"], port)
    finally:
        os.chdir(here)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", required=True, type=Path, help="another checkout's root")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/ab_frontend.py needs wrk: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-ab-"))
    lua = tmp / "bodies.lua"
    lua.write_text(LUA)
    bodies = {
        "RAG mix": write_bodies(tmp, "mix", rag_mix(2000, seed=5, passage_words=(30, 120)), 1),
        "short queries": write_bodies(tmp, "short", queries(2000, seed=6), 1),
    }
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
    matrix = [f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni"))]
    cpu += f" ({' '.join(matrix) or 'no bf16/int8 matrix flags'})"
    print(f"machine: {os.cpu_count()} CPUs, {cpu}; wrk -t1 -c64 -d{args.duration:.0f}s")
    trees = {"this": HERE, "baseline": args.baseline.resolve()}
    procs = {name: server(tree, free_port()) for name, tree in trees.items()}
    urls = {name: f"http://127.0.0.1:{p.args[p.args.index('--port') + 1]}/embed"  # type: ignore[attr-defined]
            for name, p in procs.items()}  # fmt: skip
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        for name in trees:  # warm both
            for path in bodies.values():
                wrk(urls[name], path, lua, 3, 64)
        for k in range(args.rounds):
            order = list(trees) if k % 2 == 0 else list(reversed(trees))
            for workload, path in bodies.items():
                for name in order:
                    r = wrk(urls[name], path, lua, args.duration, 64)
                    assert r["errors"] == 0, r
                    rates.setdefault((workload, name), []).append(r["rps"])
                    print(f"round {k + 1} {workload:13s} {name:8s} {r['rps']:8.1f} req/s")
    finally:
        for p in procs.values():
            stop(p)  # type: ignore[arg-type]
    for workload in bodies:
        this, base = rates[(workload, "this")], rates[(workload, "baseline")]
        ratios = [a / b for a, b in zip(this, base, strict=True)]
        print(
            f"{workload:13s} this {statistics.median(this):8.1f} req/s, baseline "
            f"{statistics.median(base):8.1f}: ratio {statistics.median(ratios):.3f} "
            f"(rounds {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
