"""BGE-M3's three outputs (dense, lexical weights, ColBERT vectors): one /encode request
against three requests (/embed, /embed_sparse, /embed_multivector) and against
FlagEmbedding's BGEM3FlagModel.encode with all three, on the same texts, in one run.

    python bench/multivector.py                          # about 4 minutes on 2 CPUs
    python bench/multivector.py --layers 2 --hidden 64   # a quick check of the script

The model has bge-m3's layers and width (24 x 1024, 16 heads) with random weights and both
heads (sparse_linear.pt, colbert_linear.pt); its vocabulary is BERT's (MiniLM's tokenizer)
instead of XLM-R's 250k, which changes an embedding lookup, not the arithmetic. Printed:
inputs/s of each way, 32-input requests from 2 clients, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from throughput import free_port, start, stop
from workload import rag_mix


def build(folder: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import BertModel

    from tests.support.models import build_tiny_bert, tiny_config

    build_tiny_bert(folder, pooling="cls", seed=0, max_seq_length=512)
    heads = max(hidden // 64, 2)
    config = tiny_config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder), safe_serialization=True)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = hidden
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    torch.save(
        {"weight": torch.randn(1, hidden) / 30, "bias": torch.zeros(1)},
        folder / "sparse_linear.pt",
    )
    torch.save(
        {"weight": torch.randn(hidden, hidden) / 30, "bias": torch.zeros(hidden)},
        folder / "colbert_linear.pt",
    )
    return folder


async def rate(url: str, calls: list[tuple[str, dict]], texts: list[str], seconds: float) -> float:
    """Inputs/s when 2 clients each send `calls` (all for the same 32 texts) in turn."""
    import aiohttp

    done = 0
    stop_at = time.perf_counter() + seconds
    async with aiohttp.ClientSession(url) as session:

        async def client(k: int) -> None:
            nonlocal done
            i = k * 32
            while time.perf_counter() < stop_at:
                batch = [texts[(i + j) % len(texts)] for j in range(32)]
                i += 64
                for path, extra in calls:
                    async with session.post(path, json={"inputs": batch, **extra}) as r:
                        await r.read()
                        assert r.status == 200, await r.text()
                done += 32

        t0 = time.perf_counter()
        await asyncio.gather(client(0), client(1))
        return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    from FlagEmbedding import BGEM3FlagModel

    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-m3-"))
    folder = build(tmp / "m3", args.layers, args.hidden)
    texts = rag_mix(args.texts, seed=4, passage_words=(20, 60))
    reference = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu")
    reference.encode(texts[:8], return_sparse=True, return_colbert_vecs=True)  # warm up
    t0 = time.perf_counter()
    reference.encode(texts, batch_size=32, return_sparse=True, return_colbert_vecs=True)
    flag = len(texts) / (time.perf_counter() - t0)
    del reference
    print(f"{args.layers} layers x {args.hidden}; {len(texts)} RAG-mix texts")
    print(f"FlagEmbedding BGEM3FlagModel.encode, all three outputs, batch 32: {flag:.1f} inputs/s")

    models = tmp / "models.yaml"
    entry = {
        "name": "m3",
        "hf_id": "bench/m3",
        "revision": "0" * 40,
        "local_dir": str(folder),
        "pooling": "cls",
        "max_seq_length": 512,
        "lexical_weights": True,
        "multivector": True,
    }
    models.write_text(json.dumps({"default_models": ["m3"], "models": [entry]}))
    port = free_port()
    cmd = [sys.executable, "-m", "embedsvc", "serve", "--port", str(port)]
    proc = start([*cmd, "--models-file", str(models), "--max-queue-time", "0"], port)
    try:
        url = f"http://127.0.0.1:{port}"
        everything = {"outputs": ["dense", "sparse", "multivector"]}
        one = asyncio.run(rate(url, [("/encode", everything)], texts, args.seconds))
        routes = [("/embed", {}), ("/embed_sparse", {}), ("/embed_multivector", {})]
        three = asyncio.run(rate(url, routes, texts, args.seconds))
    finally:
        stop(proc)
    print(f"embedsvc /encode, all three outputs: {one:.1f} inputs/s")
    print(
        f"embedsvc three requests (/embed, /embed_sparse, /embed_multivector): {three:.1f} inputs/s"
    )
    print(f"ratios: /encode / three requests {one / three:.2f}; ", end="")
    print(f"/encode / FlagEmbedding {one / flag:.2f}")


if __name__ == "__main__":
    main()
