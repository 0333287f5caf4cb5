"""A decoder embedder served against its offline limit, in one run: Qwen3-Embedding-0.6B's
architecture (28 layers, 1024 wide, 16 query and 8 key-value heads, last-token pooling)
with random weights, which cost the same to run as the real ones and need no download.

    python bench/decoder.py                          # about 10 minutes on 2 CPUs
    python bench/decoder.py --layers 2 --hidden 64   # a quick check of the script

The texts are RAG-mix queries and short passages, tokenized by a small byte-level tokenizer
built here (so a text is more tokens than with Qwen's own; both sides get the same ones).
Printed: the offline limit (SentenceTransformer.encode at its best batch size), embedsvc
with 1-input requests from 16 concurrent clients and 32-input requests from 2, in inputs/s,
and their ratios. The client (Python, aiohttp) takes little CPU next to a 0.6B model.

    python bench/decoder.py --device cuda --texts 2048 --seconds 20 --report gpu.json

runs it on a GPU in float16 on both sides (the server's dtype auto for these weights), with
64 clients of 1-input requests and 8 of 32-input ones, and adds tokens/s and the ratios to
the report of bench/gpu.sh (bench/report.py).
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
from report import Report
from throughput import Load, closed_loop, free_port, start, stop
from workload import rag_mix


def build(folder: Path, layers: int, hidden: int) -> Path:
    """The architecture with random weights, as sentence-transformers saves it."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from tests.support.models import _sentence_transformers_files, build_byte_level_tokenizer

    tok = build_byte_level_tokenizer(folder, "<|endoftext|>")
    eos = tok.token_to_id("<|endoftext|>")
    heads = max(hidden // 64, 2)
    config = Qwen3Config(
        vocab_size=151_669,  # Qwen3's: the embedding table as large as the real one
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=128 if hidden >= 1024 else hidden // heads,
        max_position_embeddings=32_768,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    Qwen3Model(config).eval().save_pretrained(str(folder), safe_serialization=True)
    _sentence_transformers_files(folder, dimension=hidden, max_seq_length=512)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=60.0, help="per server measurement")
    ap.add_argument("--device", default="cpu", help="cuda: float16 on both sides")
    ap.add_argument("--report", type=Path, help="add the figures to this JSON (and its .md)")
    args = ap.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    gpu = args.device == "cuda"
    kwargs = {"dtype": torch.float16} if gpu else {}
    clients, batch_clients = (64, 8) if gpu else (16, 2)

    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-decoder-"))
    folder = build(tmp / "qwen3", args.layers, args.hidden)
    texts = rag_mix(args.texts, seed=3, passage_words=(20, 60))
    model = SentenceTransformer(str(folder), device=args.device, model_kwargs=kwargs)
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"Qwen3 architecture, {args.layers} layers x {args.hidden}: {params:.2f} B parameters;")
    mean = sum(lengths) / len(lengths)
    print(f"{len(texts)} texts of {min(lengths)}-{max(lengths)} tokens (mean {mean:.0f})")
    model.encode(texts[:8], batch_size=8)  # warm up
    rates = {}
    sync = torch.cuda.synchronize if gpu else lambda: None
    for bs in (32, 64, 128) if gpu else (8, 16, 32):
        sync()
        t0 = time.perf_counter()
        model.encode(texts, batch_size=bs)
        sync()
        rates[bs] = len(texts) / (time.perf_counter() - t0)
    best = max(rates, key=lambda b: rates[b])
    print("offline limit: " + ", ".join(f"batch {b}: {r:.1f}/s" for b, r in rates.items()))
    del model

    models = tmp / "models.yaml"
    entry = {
        "name": "qwen3",
        "hf_id": "bench/qwen3",
        "revision": "0" * 40,
        "local_dir": str(folder),
        "pooling": "lasttoken",
        "max_seq_length": 512,
    }
    models.write_text(json.dumps({"default_models": ["qwen3"], "models": [entry]}))
    port = free_port()
    proc = start(
        [
            sys.executable,
            "-m",
            "embedsvc",
            "serve",
            "--port",
            str(port),
            "--models-file",
            str(models),
            "--log-level",
            "warning",
            "--max-queue-time",
            "0",
        ],
        port,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        single = asyncio.run(closed_loop(url, Load(texts, 1), clients, args.seconds))
        per = min(32, len(texts))
        batch = asyncio.run(closed_loop(url, Load(texts, per), batch_clients, args.seconds))
    finally:
        stop(proc)
    limit = rates[best]
    print(
        f"embedsvc, 1-input requests, {clients} clients: {single['inputs_per_s']:.1f} "
        f"inputs/s (p50 {single['p50_ms']:.0f} ms)"
    )
    print(
        f"embedsvc, {per}-input requests, {batch_clients} clients: "
        f"{batch['inputs_per_s']:.1f} inputs/s"
    )
    print(
        f"ratios to the offline limit (batch {best}, {limit:.1f}/s): "
        f"1-input {single['inputs_per_s'] / limit:.2f}, "
        f"{per}-input {batch['inputs_per_s'] / limit:.2f}"
    )
    report = Report(args.report, "decoder")
    report.fact("decoder", f"Qwen3 architecture, {args.layers} x {args.hidden}, {args.device}")
    report.add(f"offline limit (batch {best})", limit * mean, "tokens/s")
    report.add("embedsvc, 1-input requests", single["inputs_per_s"] * mean, "tokens/s")
    report.add(f"embedsvc, {per}-input requests", batch["inputs_per_s"] * mean, "tokens/s")
    report.add("1-input / offline", single["inputs_per_s"] / limit, "x", ">= 0.9")
    report.add(f"{per}-input / offline", batch["inputs_per_s"] / limit, "x", ">= 1.0")
    report.write()


if __name__ == "__main__":
    main()
