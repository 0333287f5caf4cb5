"""A ColBERT model (task multivector) served on /embed_multivector against the offline
limit of the same model: sentence-transformers' MultiVectorEncoder.encode_document /
encode_query at its best batch size, on the same texts, in one run.

    python bench/colbert.py                          # about 3 minutes on 2 CPUs
    python bench/colbert.py --layers 2 --hidden 64   # a quick check of the script

The model has answerai-colbert-small-v1's shape (12 x 384 BERT, 12 heads, a Dense
projection to 96 per token) with random weights, saved as PyLate saves it ([unused0] /
[unused1] markers, queries expanded to 32 tokens, punctuation skiplist). Requests of 32
inputs from 2 clients, answers as base64 (the compact form a bulk client asks for); printed:
inputs/s of each side and the ratios.
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
from multivector import rate
from throughput import free_port, start, stop
from workload import rag_mix


def build(folder: Path, layers: int, hidden: int) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import BertModel

    from tests.support.models import build_tiny_colbert, tiny_config

    build_tiny_colbert(folder, seed=0, query_length=32, document_length=300)
    config = tiny_config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 2),
        intermediate_size=4 * hidden,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder), safe_serialization=True)
    dense = {"in_features": hidden, "out_features": 96, "bias": False}
    dense["activation_function"] = "torch.nn.modules.linear.Identity"
    (folder / "1_Dense" / "config.json").write_text(json.dumps(dense))
    weight = torch.randn(96, hidden) / 30
    save_file({"linear.weight": weight}, str(folder / "1_Dense" / "model.safetensors"))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 299}))
    return folder


def offline(folder: Path, texts: list[str], query: bool) -> tuple[float, int]:
    """encode_query / encode_document inputs/s at the best of a few batch sizes."""
    from sentence_transformers import MultiVectorEncoder

    model = MultiVectorEncoder(str(folder), device="cpu", local_files_only=True)
    encode = model.encode_query if query else model.encode_document
    encode(texts[:8])  # warm up
    best = (0.0, 0)
    for size in (16, 32, 64):
        t0 = time.perf_counter()
        encode(texts, batch_size=size)
        best = max(best, (len(texts) / (time.perf_counter() - t0), size))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-colbert-"))
    folder = build(tmp / "colbert", args.layers, args.hidden)
    docs = rag_mix(args.texts, seed=4, passage_words=(20, 60))
    queries = rag_mix(args.texts, seed=5, passage_words=(3, 12))
    doc_limit, doc_batch = offline(folder, docs, query=False)
    query_limit, query_batch = offline(folder, queries, query=True)
    print(f"{args.layers} layers x {args.hidden}, 96 per token; {len(docs)} texts per side")
    print(f"MultiVectorEncoder.encode_document: {doc_limit:.1f} inputs/s (batch {doc_batch})")
    print(f"MultiVectorEncoder.encode_query: {query_limit:.1f} inputs/s (batch {query_batch})")

    models = tmp / "models.yaml"
    entry = {
        "name": "colbert",
        "hf_id": "bench/colbert",
        "revision": "0" * 40,
        "local_dir": str(folder),
        "task": "multivector",
    }
    models.write_text(json.dumps({"default_models": ["colbert"], "models": [entry]}))
    port = free_port()
    cmd = [sys.executable, "-m", "embedsvc", "serve", "--port", str(port)]
    proc = start([*cmd, "--models-file", str(models), "--max-queue-time", "0"], port)
    packed = {"encoding_format": "base64"}
    try:
        url = f"http://127.0.0.1:{port}"
        doc_calls = [("/embed_multivector", packed | {"prompt_name": "document"})]
        served_docs = asyncio.run(rate(url, doc_calls, docs, args.seconds))
        query_calls = [("/embed_multivector", packed | {"prompt_name": "query"})]
        served_queries = asyncio.run(rate(url, query_calls, queries, args.seconds))
    finally:
        stop(proc)
    print(f"embedsvc /embed_multivector documents: {served_docs:.1f} inputs/s")
    print(f"embedsvc /embed_multivector queries: {served_queries:.1f} inputs/s")
    print(
        f"ratios (server / offline limit): documents {served_docs / doc_limit:.2f}; "
        f"queries {served_queries / query_limit:.2f}"
    )


if __name__ == "__main__":
    main()
