"""Offline throughput of the backends on the same texts, in one run, as ratios.

    python bench/backends.py                  # bundled all-MiniLM-L6-v2, exports if needed

torch fp32 (sentence-transformers modules) vs onnxruntime fp32 vs onnxruntime int8, each
through the embedsvc backend class (tokenized once, sorted by length, batches within the
CPU token budget), plus cosine of each against torch fp32 on the same inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import rag_mix

from embedsvc.backends import load_model
from embedsvc.engine.batcher import Item, pad
from embedsvc.engine.tokenize import TextTokenizer
from embedsvc.export import export_model
from embedsvc.model_files import resolve_model_dir
from embedsvc.registry import load_registry


def batches(ids: list[list[int]], budget: int) -> list[list[int]]:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(ids[i]) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return [*out, cur] if cur else out


def run(model, ids: list[list[int]], groups: list[list[int]]) -> tuple[float, np.ndarray]:
    vecs = np.zeros((len(ids), model.backend.dimension), dtype=np.float32)
    model.backend.forward(pad([Item(None, 0, ids[0])], model.pad_token_id))  # warm up
    t0 = time.perf_counter()
    for g in groups:
        out = model.backend.forward(pad([Item(None, i, ids[i]) for i in g], model.pad_token_id))
        vecs[g] = out
    rate = len(ids) / (time.perf_counter() - t0)
    return rate, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--budget", type=int, default=2048, help="padded tokens per batch")
    ap.add_argument("--exports", default=None, help="folder with fp32/ and int8/ exports")
    args = ap.parse_args()

    spec = load_registry().select([args.model])[0]
    path = resolve_model_dir(spec)
    torch_model = load_model(spec, path)
    texts = rag_mix(args.texts, seed=11)
    tok = TextTokenizer(torch_model.tokenizer, torch_model.max_seq_length)
    ids = tok.encode(texts, prefix="", truncate=True, direction="right", param="inputs")
    groups = batches(ids, args.budget)
    exports = Path(args.exports or tempfile.mkdtemp(prefix="embedsvc-exports-"))
    results = {}
    rate, ref = run(torch_model, ids, groups)
    results["torch fp32"] = (rate, 1.0, 1.0)
    print(f"torch fp32      {rate:8.1f} inputs/s", flush=True)
    for variant in ("fp32", "int8"):
        if not (exports / variant / "model.onnx").is_file():
            export_model(spec, path, variant, exports / variant)
        onnx_spec = dataclasses.replace(
            spec, backend="onnx", onnx_variant=variant, onnx_dir=str(exports)
        )
        model = load_model(onnx_spec, path)
        rate, vecs = run(model, ids, groups)
        cos = (vecs * ref).sum(axis=1)
        results[f"onnx {variant}"] = (rate, float(cos.min()), float(cos.mean()))
        print(f"onnx {variant:10s} {rate:8.1f} inputs/s  cos vs torch: min {cos.min():.4f} "
              f"mean {cos.mean():.4f}", flush=True)  # fmt: skip
    base = results["torch fp32"][0]
    print()
    print(f"{len(texts)} texts (RAG mix), batches of <= {args.budget} padded tokens")
    for name, (rate, cmin, cmean) in results.items():
        print(f"ratio {name:10s} / torch fp32 = {rate / base:.2f}  (cos min {cmin:.4f}, "
              f"mean {cmean:.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
