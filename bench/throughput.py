"""Server throughput and latency against the offline limit of the same model, in one run.

    python bench/throughput.py                 # bundled all-MiniLM-L6-v2, about 3 minutes
    python bench/throughput.py --duration 30   # longer, steadier runs

Measures, on the same model and the same RAG mix (half short queries, half 100-300 token
passages):
  (a) offline limit: SentenceTransformer.encode over the mix at its best batch size
  (b) embedsvc at saturation: many concurrent clients, 1-input and 32-input requests
  (c) a naive server (one encode per request, bench/naive_server.py), same load
  (d) embedsvc latency p50/p99 at concurrency 1 and at about half of saturation
  (e) overhead of one short query: server p50 minus the raw forward pass p50
and prints the ratios last. The load generator runs on the same machine and takes CPU
from the server; its CPU time is printed so the reader can judge.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import query, rag_mix

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_dir(name: str) -> str:
    from embedsvc.model_files import resolve_model_dir
    from embedsvc.registry import load_registry

    return str(resolve_model_dir(load_registry().select([name])[0]))


# ---- offline -------------------------------------------------------------------------


def offline_limit(path: str, texts: list[str], sizes: list[int]) -> tuple[int, float]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    model.encode(texts[:64], batch_size=32)  # warm up
    best = (0, 0.0)
    for bs in sizes:
        t0 = time.perf_counter()
        model.encode(texts, batch_size=bs, normalize_embeddings=True)
        rate = len(texts) / (time.perf_counter() - t0)
        print(f"  offline encode batch_size={bs:4d}: {rate:8.1f} inputs/s")
        best = max(best, (bs, rate), key=lambda x: x[1])
    return best


def raw_forward_p50(path: str, text: str, n: int) -> float:
    """p50 of the model's forward pass alone (tokenized once), batch of one."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu", local_files_only=True)
    features = model.tokenize([text])
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            model.forward(dict(features))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- load ----------------------------------------------------------------------------


class Load:
    def __init__(
        self, texts: list[str], per_request: int, seed: int = 1, openai_model: str | None = None
    ) -> None:
        self.texts = texts
        self.per_request = per_request
        self.rng = random.Random(seed)
        self.openai_model = openai_model  # set: OpenAI-dialect bodies for `path`
        self.path = "/embed"

    def body(self) -> dict:
        if self.openai_model is not None:
            n = self.per_request
            texts = self.rng.sample(self.texts, n) if n > 1 else [self.rng.choice(self.texts)]
            return {"input": texts, "model": self.openai_model}
        # truncate: passages may exceed the model's limit; sentence-transformers (and so
        # the offline limit and the naive server) truncate silently.
        if self.per_request == 1:
            return {"inputs": self.rng.choice(self.texts), "truncate": True}
        return {"inputs": self.rng.sample(self.texts, self.per_request), "truncate": True}


async def closed_loop(url: str, load: Load, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients each send a request as soon as the previous one returns."""
    done_inputs = 0
    latencies: list[float] = []
    internal: list[float] = []  # server time outside the forward pass (x-total - x-inference)
    errors = 0
    stop_at = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(url, connector=conn) as session:

        async def client() -> None:
            nonlocal done_inputs, errors
            while time.perf_counter() < stop_at:
                body = load.body()
                t0 = time.perf_counter()
                async with session.post(load.path, json=body) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
                    if "x-inference-time" in r.headers:
                        internal.append(
                            (
                                float(r.headers["x-total-time"])
                                - float(r.headers["x-inference-time"])
                            )
                            / 1000
                        )
                latencies.append(time.perf_counter() - t0)
                done_inputs += load.per_request

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "inputs_per_s": done_inputs / elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
        "internal_p50_ms": pct(internal, 50),
        "errors": errors,
    }


async def open_loop(url: str, load: Load, rate: float, seconds: float) -> dict:
    """Requests arrive at `rate` per second (Poisson), whatever the server does."""
    latencies: list[float] = []
    rng = random.Random(7)
    tasks = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=conn) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            async with session.post("/embed", json=load.body()) as r:
                await r.read()
            latencies.append(time.perf_counter() - t0)

        end = time.perf_counter() + seconds
        next_at = time.perf_counter()
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return {"p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "n": len(latencies)}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")


# ---- servers -------------------------------------------------------------------------


def start(cmd: list[str], port: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    import urllib.request

    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server died")
    raise RuntimeError("server did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure_server(url: str, texts: list[str], seconds: float, label: str) -> dict:
    out = {}
    for per_request, concurrency in ((1, 96), (32, 12)):
        asyncio.run(closed_loop(url, Load(texts, per_request), concurrency, 2))  # warm up
        r = asyncio.run(closed_loop(url, Load(texts, per_request), concurrency, seconds))
        print(
            f"  {label:9s} {per_request:2d}-input requests x{concurrency:3d} clients: "
            f"{r['inputs_per_s']:8.1f} inputs/s  p50 {r['p50_ms']:7.1f} ms  "
            f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}"
        )
        out[per_request] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds per load run")
    ap.add_argument("--texts", type=int, default=1500)
    args = ap.parse_args()

    path = model_dir(args.model)
    texts = rag_mix(args.texts)
    short = query(random.Random(3))
    print(f"model {args.model} ({path}); {len(texts)} texts, half queries, half passages")
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")

    print("(a) offline limit")
    best_bs, offline = offline_limit(path, texts, [16, 32, 64, 128])
    forward_p50 = raw_forward_p50(path, short, 300)
    print(
        f"  best: batch_size={best_bs}, {offline:.1f} inputs/s; raw forward p50 "
        f"(one short query) {forward_p50 * 1000:.2f} ms"
    )

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    proc = start(
        [sys.executable, "-m", "embedsvc", "serve", "--port", str(port), "--models", args.model],
        port,
    )
    try:
        print("(b) embedsvc at saturation")
        ours = measure_server(url, texts, args.duration, "embedsvc")
        print("(d) embedsvc latency")
        c1 = asyncio.run(closed_loop(url, Load([short], 1), 1, args.duration / 2))
        print(f"  concurrency 1, short query: p50 {c1['p50_ms']:.2f} ms  p99 {c1['p99_ms']:.2f} ms")
        half_rate = ours[1]["requests_per_s"] / 2
        half = asyncio.run(open_loop(url, Load(texts, 1), half_rate, args.duration))
        print(
            f"  open loop at {half_rate:.0f} req/s (half of saturation), RAG mix: "
            f"p50 {half['p50_ms']:.1f} ms  p99 {half['p99_ms']:.1f} ms"
        )
    finally:
        stop(proc)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)

    port = free_port()
    proc = start([sys.executable, str(ROOT / "bench" / "naive_server.py"), path, str(port)], port)
    try:
        print("(c) naive server (one encode per request)")
        naive = measure_server(f"http://127.0.0.1:{port}", texts, args.duration, "naive")
    finally:
        stop(proc)

    client_cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    print(f"load generator CPU time during the embedsvc runs: {client_cpu:.1f} s")
    overhead = c1["p50_ms"] - forward_p50 * 1000
    print(
        "(e) overhead of one short query: end-to-end p50 (client included) - raw forward "
        f"p50 = {c1['p50_ms']:.2f} - {forward_p50 * 1000:.2f} = {overhead:.2f} ms; inside "
        "the server, time outside the forward pass p50 = "
        f"{c1['internal_p50_ms']:.2f} ms"
    )
    print()
    print(f"ratio embedsvc 1-input  / offline = {ours[1]['inputs_per_s'] / offline:.2f}")
    print(f"ratio embedsvc 32-input / offline = {ours[32]['inputs_per_s'] / offline:.2f}")
    print(f"ratio naive    1-input  / offline = {naive[1]['inputs_per_s'] / offline:.2f}")
    print(f"ratio naive    32-input / offline = {naive[32]['inputs_per_s'] / offline:.2f}")
    print(f"short-query overhead p50, end to end = {overhead:.2f} ms")
    print(f"short-query overhead p50, inside the server = {c1['internal_p50_ms']:.2f} ms")


if __name__ == "__main__":
    main()
