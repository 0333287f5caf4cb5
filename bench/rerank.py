"""Reranking throughput: embedsvc's /v1/rerank against the offline `CrossEncoder.predict`
limit on the same pairs, in one run.

    python bench/rerank.py                 # ~3 minutes on 2 cores

No reranker weights ship on PyPI, so the benchmark builds one with the architecture of
cross-encoder/ms-marco-MiniLM-L6-v2 (6 layers, 384 wide: the bundled all-MiniLM-L6-v2 encoder
with a one-label classifier head); it costs what that reranker costs per pair. Workload: each
request is one short query with 20-100 passages of 30-120 words (a RAG app reranking its
retrieved candidates). Printed: pairs/s of `CrossEncoder.predict` at each batch size, pairs/s
of the server at 1 and 4 concurrent clients (a Python client; a request carries 60 pairs on
average, so it is not the bottleneck), latency at 1 client, and the ratio to the best offline.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from throughput import free_port, start, stop
from workload import passage, query


def build_reranker(folder: Path) -> Path:
    from transformers import BertForSequenceClassification

    from tests.support.models import MINILM_PATH, TOKENIZER_FILES

    model = BertForSequenceClassification.from_pretrained(str(MINILM_PATH), num_labels=1)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_PATH / name, folder / name)
    models = folder.parent / "models.yaml"
    models.write_text(
        "default_models: [minilm-reranker]\nmodels:\n  - name: minilm-reranker\n"
        f"    hf_id: bench/minilm-reranker\n    revision: '{'0' * 40}'\n"
        f"    local_dir: {folder}\n    task: rerank\n    max_seq_length: 512\n"
    )
    return models


def requests(n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    return [
        (query(rng), [passage(rng, (30, 120)) for _ in range(rng.randint(20, 100))])
        for _ in range(n)
    ]


def offline(folder: Path, reqs: list[tuple[str, list[str]]], sizes: list[int]) -> float:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(folder), device="cpu")
    pairs = [(q, d) for q, docs in reqs for d in docs]
    ce.predict(pairs[:64])
    best = 0.0
    for bs in sizes:
        t0 = time.perf_counter()
        ce.predict(pairs, batch_size=bs)
        rate = len(pairs) / (time.perf_counter() - t0)
        print(f"  CrossEncoder.predict batch_size={bs:3d}: {rate:7.1f} pairs/s", flush=True)
        best = max(best, rate)
    return best


async def clients(url: str, reqs: list[tuple[str, list[str]]], n: int, seconds: float) -> dict:
    import aiohttp

    pairs, lat = 0, []
    errors: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    it = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal pairs
        while time.perf_counter() < deadline:
            q, docs = reqs[next(it) % len(reqs)]
            t0 = time.perf_counter()
            body = {"query": q, "documents": docs, "top_n": 10}
            async with session.post(url + "/v1/rerank", json=body) as r:
                await r.read()
                if r.status != 200:  # 429: admission by time refused it
                    errors[r.status] = errors.get(r.status, 0) + 1
                    continue
            lat.append(time.perf_counter() - t0)
            pairs += len(docs)

    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(n)))
    elapsed = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {
        "pairs_per_s": pairs / elapsed,
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="distinct requests in the workload")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--batch-sizes", default="16,32,64")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="embedsvc-rerank-"))
    folder = work / "minilm-reranker"
    models = build_reranker(folder)
    reqs = requests(args.requests, seed=3)
    n_pairs = sum(len(d) for _, d in reqs)
    print(f"{len(reqs)} requests, {n_pairs} pairs (1 query x 20-100 passages of 30-120 words)")
    best = offline(folder, reqs, [int(b) for b in args.batch_sizes.split(",")])
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--models-file",
        str(models),
    ]
    proc = start(cmd, port)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(clients(url, reqs, 1, 3))  # warm up
        for n in (1, 4):
            r = asyncio.run(clients(url, reqs, n, args.seconds))
            print(
                f"  embedsvc /v1/rerank, {n} client(s): {r['pairs_per_s']:7.1f} pairs/s, "
                f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, non-200 {r['errors'] or 'none'}; "
                f"ratio to the best predict: {r['pairs_per_s'] / best:.2f}"
            )
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
