"""The served model against the best offline engine on this CPU, precision by precision,
in one run: what `dtype: auto` buys on a CPU with bf16 matrix units (AVX512-BF16, AMX).

    make install-bench && .venv/bin/python bench/matrix_units.py      # about 8 minutes

Two workloads of the same size: a RAG mix (passages of 30-120 words and queries of 4-14)
and short queries alone. Offline, on all cores, each at its best of batch 16/32/64:
sentence-transformers (torch fp32, torch with bf16 weights) and OpenVINO (its own default
precision for this CPU, and f32), the last only where the `openvino` package is installed
(the bench extra installs it). Served: embedsvc at its defaults (dtype auto) and at
`--dtype float32`, single-input requests from wrk at 64 connections and 32-input requests
at 8, the load generator on the same cores. Every engine's vectors, and every served
model's (asked for once more after the load), are compared with torch fp32 by cosine.

Last it names the fastest offline engine whose worst cosine is >= 0.9999 and prints the
served rates over it. The CPU's model and its matrix flags head the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import cpu_description
from frontend import LUA, load_server, write_bodies
from throughput import free_port, model_dir, start, stop
from workload import queries, rag_mix

BOUND = 0.9999
SIZES = (16, 32, 64)


def workloads(n: int) -> dict[str, list[str]]:
    return {
        "RAG mix": rag_mix(n, seed=11, passage_words=(30, 120)),
        "queries": queries(n, seed=3),
    }


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def best_rate(encode: Any, texts: list[str]) -> tuple[float, int, np.ndarray]:
    """The best inputs/s over SIZES (each size run once to warm, once timed)."""
    best = (0.0, 0, np.empty(0))
    for bs in SIZES:
        encode(texts[:64], bs)
        t0 = time.perf_counter()
        vectors = encode(texts, bs)
        rate = len(texts) / (time.perf_counter() - t0)
        if rate > best[0]:
            best = (rate, bs, vectors)
    return best


def st_engine(path: str, bf16: bool) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if bf16 else {}
    model = SentenceTransformer(path, device="cpu", local_files_only=True, **kwargs)

    def encode(texts: list[str], bs: int) -> np.ndarray:
        return model.encode(texts, batch_size=bs, convert_to_numpy=True)

    return encode


def openvino_engines(path: str) -> dict[str, Any]:
    """OpenVINO at its default precision for this CPU and at f32: the sentence-transformers
    model's transformer and pooling converted with openvino.convert_model, fed batches
    sorted by length as sentence-transformers feeds its own."""
    try:
        import openvino as ov
    except ImportError:
        print("  (OpenVINO skipped: pip install openvino, or make install-bench)")
        return {}
    import os

    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cpu", local_files_only=True)
    tokenizer, max_len = st.tokenizer, st.max_seq_length
    dimension = st[0].auto_model.config.hidden_size
    pooling = st[1]

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = st[0].auto_model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            states = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            feats = {"token_embeddings": states, "attention_mask": attention_mask}
            return pooling(feats)["sentence_embedding"]

    example = dict(tokenizer(["a b", "c"], return_tensors="pt", padding=True))
    graph = ov.convert_model(Pooled().eval(), example_input=example)
    core = ov.Core()
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    threads = {"INFERENCE_NUM_THREADS": os.cpu_count() or 1, "PERFORMANCE_HINT": "LATENCY"}
    out = {}
    for label, hint in ((f"OpenVINO default ({default})", None), ("OpenVINO f32", "f32")):
        config = dict(threads, **({"INFERENCE_PRECISION_HINT": hint} if hint else {}))
        request = core.compile_model(graph, "CPU", config).create_infer_request()

        def encode(texts: list[str], bs: int, request: Any = request) -> np.ndarray:
            order = np.argsort([-len(t) for t in texts], kind="stable")
            vectors = np.zeros((len(texts), dimension), np.float32)
            for i in range(0, len(texts), bs):
                rows = order[i : i + bs]
                batch = tokenizer(
                    [texts[j] for j in rows],
                    padding=True,
                    truncation=True,
                    max_length=max_len,
                    return_tensors="np",
                )
                feed = {k: batch[k] for k in ("input_ids", "attention_mask")}
                vectors[rows] = next(iter(request.infer(feed).values()))
            return vectors

        out[label] = encode
    return out


def served(
    port: int, dtype: str, data: dict[str, list[str]], folder: Path, seconds: float, model: str
) -> tuple[str, dict[str, dict[str, float]], dict[str, np.ndarray]]:
    cmd = [sys.executable, "-m", "embedsvc", "serve", "--port", str(port), "--models", model]
    cmd += ["--log-level", "warning"] + (["--dtype", dtype] if dtype else [])
    proc = start(cmd, port)
    url = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{url}/info", timeout=10) as r:
            precision = json.loads(r.read())["models"][0]["precision"]
        lua = folder / "bodies.lua"
        lua.write_text(LUA)
        rates: dict[str, dict[str, float]] = {}
        vectors = {}
        for name, texts in data.items():
            rates[name] = {}
            for per, conns in ((1, 64), (32, 8)):
                bodies = write_bodies(folder, f"{name}-{per}".replace(" ", "_"), texts, per)
                r = load_server(f"{url}/embed", proc.pid, bodies, lua, seconds, 3, conns)
                rates[name][f"{per}-input"] = r["rps"] * per
                print(
                    f"  embedsvc {dtype or 'default':8s} {name:8s} {per:2d}-input: "
                    f"{r['rps'] * per:8.1f} inputs/s (errors {r['errors']}, "
                    f"wrk CPU {r['wrk_cpu']:.1f} s)",
                    flush=True,
                )
            vectors[name] = embed_all(url, texts)
        return precision, rates, vectors
    finally:
        stop(proc)


def embed_all(url: str, texts: list[str]) -> np.ndarray:
    rows = []
    for i in range(0, len(texts), 32):
        body = json.dumps({"inputs": texts[i : i + 32], "truncate": True}).encode()
        req = urllib.request.Request(
            f"{url}/embed", body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            rows.extend(json.loads(r.read()))
    return np.asarray(rows, dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--texts", type=int, default=800, help="texts per workload")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds per served load run")
    ap.add_argument("--no-openvino", action="store_true")
    args = ap.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)
    path = model_dir(args.model)
    data = workloads(args.texts)

    engines = {"torch fp32": st_engine(path, False), "torch bf16 weights": st_engine(path, True)}
    if not args.no_openvino:
        engines.update(openvino_engines(path))
    reference = {name: unit(engines["torch fp32"](texts, 32)) for name, texts in data.items()}
    offline: dict[str, dict[str, tuple[float, float]]] = {}
    print("offline (sentence-transformers encode / OpenVINO, best batch of 16/32/64):")
    for engine, encode in engines.items():
        offline[engine] = {}
        for name, texts in data.items():
            rate, bs, vectors = best_rate(encode, texts)
            cos = float((unit(vectors) * reference[name]).sum(1).min())
            offline[engine][name] = (rate, cos)
            print(
                f"  {engine:28s} {name:8s} {rate:8.1f} inputs/s (batch {bs:2d}) min cos {cos:.5f}",
                flush=True,
            )
    del engines

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("", "float32"):
            precision, rates, vectors = served(
                free_port(), dtype, data, Path(tmp), args.seconds, args.model
            )
            cos = {n: float((unit(v) * reference[n]).sum(1).min()) for n, v in vectors.items()}
            results[dtype or "default"] = (precision, rates, cos)
            print(f"  embedsvc {dtype or 'default'}: {precision}; min cos {cos}", flush=True)

    print()
    print(f"CPU: {cpu_description()}; model {args.model}; {args.texts} texts per workload")
    for name in data:
        fit = {e: r[name] for e, r in offline.items() if r[name][1] >= BOUND}
        best = max(fit, key=lambda e: fit[e][0])
        rate = fit[best][0]
        print(f"{name}: best offline engine with min cos >= {BOUND}: {best} {rate:.1f} inputs/s")
        for label, (_, rates, cos) in results.items():
            ratios = ", ".join(f"{k} {v / rate:.2f}x" for k, v in rates[name].items())
            print(f"  embedsvc {label:8s} {ratios}  (min cos {cos[name]:.5f})")


if __name__ == "__main__":
    main()
