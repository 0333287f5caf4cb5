"""embedsvc vs Infinity (infinity-emb) on the same model, texts and load, in one run.

Infinity pins numpy<2 and an older sentence-transformers, so it lives in its own venv:

    python3 -m venv .venv-infinity
    .venv-infinity/bin/pip install -c requirements/torch.txt "infinity-emb[server,torch]"
    .venv/bin/python bench/peer_infinity.py --infinity .venv-infinity/bin/infinity_emb

Both servers get OpenAI-dialect requests (`POST /v1/embeddings` on embedsvc, `POST
/embeddings` on Infinity) from the same closed-loop clients: 1-input requests from 96
clients and 32-input requests from 12, on the RAG mix of bench/throughput.py. Infinity
truncates over-long inputs by itself; embedsvc is started with --auto-truncate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Load, closed_loop, free_port, model_dir, start, stop
from workload import rag_mix


def measure(url: str, path: str, model: str, texts: list[str], seconds: float) -> dict:
    out = {}
    for per_request, concurrency in ((1, 96), (32, 12)):
        load = Load(texts, per_request, openai_model=model)
        load.path = path
        asyncio.run(closed_loop(url, load, concurrency, 2))  # warm up
        r = asyncio.run(closed_loop(url, load, concurrency, seconds))
        print(
            f"  {per_request:2d}-input x{concurrency:3d}: {r['inputs_per_s']:8.1f} inputs/s  "
            f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}",
            flush=True,
        )
        out[per_request] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--infinity", default="infinity_emb", help="the infinity_emb executable")
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--duration", type=float, default=12.0)
    args = ap.parse_args()
    path = model_dir(args.model)
    texts = rag_mix(1500)
    print(f"model {args.model} ({path}); {os.cpu_count()} CPUs")

    port = free_port()
    proc = start(
        [
            sys.executable,
            "-m",
            "embedsvc",
            "serve",
            "--port",
            str(port),
            "--models",
            args.model,
            "--auto-truncate",
        ],
        port,
    )
    try:
        print("embedsvc (torch, OpenAI dialect)")
        ours = measure(
            f"http://127.0.0.1:{port}", "/v1/embeddings", args.model, texts, args.duration
        )
    finally:
        stop(proc)

    port = free_port()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    proc = start(
        [
            args.infinity,
            "v2",
            "--model-id",
            path,
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        port,
    )
    try:
        print("Infinity (torch)")
        peer = measure(f"http://127.0.0.1:{port}", "/embeddings", path, texts, args.duration)
    finally:
        stop(proc)

    print()
    for n in (1, 32):
        ratio = ours[n]["inputs_per_s"] / peer[n]["inputs_per_s"]
        print(f"ratio embedsvc / Infinity, {n:2d}-input requests = {ratio:.2f}")


if __name__ == "__main__":
    main()
