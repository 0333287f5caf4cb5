"""GPU path check and throughput, for a machine with an NVIDIA GPU (not part of the tests).

    bash bench/gpu.sh            # or: python bench/gpu_check.py [--model all-minilm-l6-v2]

1. torch: fp16 vectors vs fp32 (cosine >= 0.999 each), offline throughput of fp32 and
   fp16 at several batch sizes (the offline limit), the backend's passes with CUDA graphs
   against kernel by kernel (vectors and time per pass), and embedsvc's engine on fp16 at
   saturation (many concurrent jobs through the real front end and batching engine):
   8-input jobs of the RAG mix, and single short queries (the RAG query path), each as a
   ratio of the offline limit of the same texts.
2. onnxruntime CUDA provider (needs onnxruntime-gpu): fp16 export vs torch fp32 parity
   and throughput through the onnx backend.
Prints one PASS/FAIL line per check (SKIP for what the machine lacks) and the ratios last;
exits non-zero on a failed check. With --report PATH every figure also goes into that JSON
and a markdown table beside it (bench/report.py; bench/gpu.sh gathers the run's there).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report
from workload import queries, rag_mix

from embedsvc.backends import load_model
from embedsvc.engine import EmbedRequest, EngineSet, Texts, load_engines
from embedsvc.metrics import Metrics
from embedsvc.model_files import resolve_model_dir
from embedsvc.registry import load_registry
from embedsvc.settings import Settings

failures: list[str] = []
report = Report(None, "gpu_check")


def check(name: str, ok: bool, detail: str, cosine: float | None = None) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)
    if cosine is not None:
        report.add(f"{name}: cosine min", cosine, "", target=">= 0.999")


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def offline(model, texts: list[str], sizes: list[int]) -> tuple[int, float]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    best = (0, 0.0)
    model.encode(texts[:256], batch_size=64)
    for bs in sizes:
        sync()
        t0 = time.perf_counter()
        model.encode(texts, batch_size=bs)
        sync()
        rate = len(texts) / (time.perf_counter() - t0)
        print(f"  offline batch_size={bs:4d}: {rate:9.1f} inputs/s", flush=True)
        best = max(best, (bs, rate), key=lambda x: x[1])
    return best


async def engine_saturation(
    engines: EngineSet, texts: list[str], seconds: float, per_job: int, clients: int
) -> float:
    """Inputs/s through the real front end and batching engine (no HTTP); `engines` must
    have been started on the running loop."""
    done = 0
    stop = time.perf_counter() + seconds
    engine = engines.default

    async def client(i: int) -> None:
        nonlocal done
        k = i
        while time.perf_counter() < stop:
            chunk = [texts[(k + j) % len(texts)] for j in range(per_job)]
            k += per_job
            await engine.embed(EmbedRequest(Texts(chunk), truncate=True))
            done += len(chunk)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i * per_job) for i in range(clients)))
    return done / (time.perf_counter() - t0)


def graph_passes(spec, path, probe: list[str], dev: str, dtype: str) -> None:
    """The torch backend's passes with CUDA graphs against the same passes kernel by
    kernel (--no-cuda-graphs): their vectors, and the time of one pass at a few shapes."""
    from embedsvc.backends.base import BackendSpec
    from embedsvc.engine.batcher import Item, pad
    from embedsvc.engine.tokenize import TextTokenizer

    on = dataclasses.replace(spec, device=dev, dtype=dtype)
    models = {g: load_model(BackendSpec.of(on, cuda_graphs=g), path) for g in (False, True)}
    graphs = models[True].backend.graphs  # type: ignore[attr-defined]
    if graphs is None:
        print("SKIP CUDA graphs: not used for this model or device")
        return
    plain = models[False]
    tok = TextTokenizer(plain.tokenizer, plain.max_seq_length)
    ids = tok.encode(probe, prefix="", truncate=True, direction="right", param="x")
    print("one forward pass (median of 30), kernel by kernel vs CUDA graphs:")
    for rows in (1, 8, 32, 128, 256):
        batch = pad([Item(None, i, x) for i, x in enumerate(ids[:rows])], plain.pad_token_id)
        times = {}
        for g, m in models.items():
            for _ in range(3):
                out = m.backend.forward(batch).pooled
            ts = []
            for _ in range(30):
                t0 = time.perf_counter()
                out = m.backend.forward(batch).pooled
                ts.append(time.perf_counter() - t0)
            times[g] = (sorted(ts)[len(ts) // 2] * 1e3, out)
        c = cos_rows(times[False][1], times[True][1])
        shape = graphs.shape_for(*batch.shape)
        print(
            f"  {rows:4d} x {batch.shape[1]:3d} (graph {shape}): {times[False][0]:7.3f} ms vs "
            f"{times[True][0]:7.3f} ms = {times[False][0] / times[True][0]:5.2f}x; "
            f"cosine min {c.min():.5f}"
        )
        cmin = float(c.min())
        check(f"CUDA graph vectors, {rows} inputs", cmin >= 0.999, f"cosine min {cmin:.5f}", cmin)
        shape_name = f"{rows} x {batch.shape[1]}"
        report.add(f"pass {shape_name}, kernel by kernel", times[False][0], "ms")
        report.add(f"pass {shape_name}, CUDA graphs", times[True][0], "ms")
    varied_shapes(models, ids, dev, dtype, path)
    captured = sum(g is not None for g in graphs._graphs.values())
    check(
        "CUDA graphs captured",
        graphs.enabled and captured > 0,
        f"{captured} of {len(graphs._graphs)} shapes",
    )


def varied_shapes(models, ids: list[list[int]], dev: str, dtype: str, path: Path) -> None:
    """Passes whose shape changes every time, as under load: the traced pass (what runs
    without graphs), the same with graphs, and the eager module (no TorchScript), in ms per
    pass. A traced module re-specializes for new shapes; this shows what that costs."""
    import random

    import torch

    from embedsvc.backends import bert
    from embedsvc.engine.batcher import Item, pad

    rng = random.Random(5)
    pad_id = models[False].pad_token_id
    batches = []
    for rows in (3, 9, 17, 40, 77, 128, 5, 23, 64, 111):
        group = [ids[rng.randrange(len(ids))] for _ in range(rows)]
        batches.append(pad([Item(None, i, x) for i, x in enumerate(group)], pad_id))
    long = [(x * 20)[:200] for x in ids[:96]]  # 96 x 200 tokens: beyond the graphs' size
    batches.append(pad([Item(None, i, x) for i, x in enumerate(long)], pad_id))
    plan = bert.plan(path)
    eager = None
    if plan is not None:
        eager = bert.pooled(bert.build(plan, dev, dtype), plan.pooling).eval()
    runs = {"traced": models[False].backend.forward, "graphs": models[True].backend.forward}
    if eager is not None:

        def run_eager(batch):
            with torch.inference_mode():
                ids_, mask = (
                    torch.from_numpy(a).to(dev) for a in (batch.input_ids, batch.attention_mask)
                )
                return eager(ids_, mask).float().cpu().numpy()

        runs["eager"] = run_eager
    for fn in runs.values():  # first passes of each shape (captures, specializations)
        for batch in batches:
            fn(batch)
    line = []
    for name, fn in runs.items():
        t0 = time.perf_counter()
        for _ in range(5):
            for batch in batches:
                fn(batch)
        line.append(f"{name} {(time.perf_counter() - t0) / (5 * len(batches)) * 1e3:.3f}")
    print(f"  varied shapes ({len(batches)} shapes, one 96 x 200): ms per pass: " + ", ".join(line))


def main() -> int:
    import torch
    from sentence_transformers import SentenceTransformer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--texts", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument(
        "--random-weights",
        action="store_true",
        help="a model of --model's architecture with random weights (bench/gpu_models.py): "
        "times the same, downloads nothing",
    )
    ap.add_argument("--tokenizer", type=Path, help="tokenizer files for --random-weights")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run (float32 for fp16)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="one batch size per offline measurement: a check that the script runs",
    )
    ap.add_argument("--report", type=Path, help="add every figure to this JSON (and its .md)")
    args = ap.parse_args()
    report.path = args.report
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch")
        return 2
    low, low_name = (torch.float16, "float16") if dev == "cuda" else (torch.float32, "float32")
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "none (dry run on CPU)"
    print(f"GPU: {gpu}; torch {torch.__version__}")
    report.fact("device", gpu)
    report.fact("torch", torch.__version__)
    report.fact("model", args.model + (" (random weights)" if args.random_weights else ""))
    models_file = None
    if args.random_weights:
        from gpu_models import build_all

        folder = Path(tempfile.mkdtemp(prefix="embedsvc-gpu-models-"))
        models_file = build_all(folder, [args.model], args.tokenizer)
        print(f"{args.model}: its architecture with random weights ({folder})")
    spec = load_registry(models_file).select([args.model])[0]
    path = resolve_model_dir(spec)
    texts = rag_mix(args.texts, seed=21)
    short = queries(args.texts, seed=22)
    probe = texts[:256]

    fp32 = SentenceTransformer(str(path), device=dev)
    fp16 = SentenceTransformer(str(path), device=dev, model_kwargs={"dtype": low})
    ref = fp32.encode(probe, normalize_embeddings=True)
    half = fp16.encode(probe, normalize_embeddings=True)
    c = cos_rows(ref, half)
    detail = f"cosine min {c.min():.5f} mean {c.mean():.5f}"
    check("torch fp16 vs fp32", c.min() >= 0.999, detail, float(c.min()))

    sizes = [64] if args.quick else [64, 128, 256, 512, 1024]
    print("offline limit, torch fp32:")
    _, off32 = offline(fp32, texts, sizes[:4])
    print("offline limit, torch fp16:")
    best_bs, off16 = offline(fp16, texts, sizes)
    del fp32, fp16
    if dev == "cuda":
        torch.cuda.empty_cache()

    print("offline limit, torch fp16, short queries alone:")
    fp16 = SentenceTransformer(str(path), device=dev, model_kwargs={"dtype": low})
    _, off_short = offline(fp16, short, sizes)
    del fp16
    if dev == "cuda":
        torch.cuda.empty_cache()

    graph_passes(spec, path, short[:256], dev, low_name)

    settings = Settings(max_queue_time=0)  # a saturation run: queue, do not refuse
    fp16_spec = dataclasses.replace(spec, device=dev, dtype=low_name)
    engines = load_engines([fp16_spec], settings, Metrics())
    loop = asyncio.new_event_loop()
    engines.start(loop)
    served = loop.run_until_complete(engine_saturation(engines, texts, args.seconds, 8, 64))
    print(f"embedsvc engine, fp16, 64 concurrent 8-input jobs: {served:.1f} inputs/s")
    single = loop.run_until_complete(engine_saturation(engines, short, args.seconds, 1, 512))
    print(f"embedsvc engine, fp16, 512 concurrent 1-input short queries: {single:.1f} inputs/s")
    engines.stop()

    ort_rate = None
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        from embedsvc.engine.batcher import Item, pad
        from embedsvc.engine.tokenize import TextTokenizer
        from embedsvc.export import export_model

        out = Path(tempfile.mkdtemp(prefix="embedsvc-gpu-"))
        export_model(spec, path, "fp16", out / "fp16")
        onnx_spec = dataclasses.replace(
            spec, backend="onnx", device="cuda", onnx_variant="fp16", onnx_dir=str(out)
        )
        model = load_model(onnx_spec, path)
        tok = TextTokenizer(model.tokenizer, model.max_seq_length)
        ids = tok.encode(probe, prefix="", truncate=True, direction="right", param="x")
        got = model.backend.forward(pad([Item(None, i, x) for i, x in enumerate(ids)], 0)).pooled
        c = cos_rows(ref, got)
        providers = model.backend.session.get_providers()  # type: ignore[attr-defined]
        check(
            "onnxruntime CUDA fp16 vs torch fp32",
            c.min() >= 0.999,
            f"cosine min {c.min():.5f}; providers {providers}",
            float(c.min()),
        )
        all_ids = tok.encode(texts, prefix="", truncate=True, direction="right", param="x")
        order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
        t0 = time.perf_counter()
        for k in range(0, len(order), best_bs):
            group = [Item(None, 0, all_ids[i]) for i in order[k : k + best_bs]]
            model.backend.forward(pad(group, 0))
        ort_rate = len(texts) / (time.perf_counter() - t0)
        print(f"onnxruntime CUDA fp16, batch {best_bs}: {ort_rate:.1f} inputs/s")
    else:
        print("SKIP onnxruntime CUDA: this onnxruntime has none (install embedsvc[onnx-gpu])")

    print()
    print(f"ratio torch fp16 / fp32 offline        = {off16 / off32:.2f}")
    print(f"ratio embedsvc engine fp16 / offline   = {served / off16:.2f}")
    print(f"ratio 1-input short queries / offline  = {single / off_short:.2f}")
    if ort_rate:
        print(f"ratio onnxruntime fp16 / torch fp16    = {ort_rate / off16:.2f}")
    for name, value in (
        ("offline fp32, RAG mix", off32),
        ("offline fp16, RAG mix", off16),
        ("offline fp16, short queries", off_short),
        ("engine fp16, 8-input jobs of the RAG mix", served),
        ("engine fp16, 1-input short queries", single),
    ):
        report.add(name, value, "inputs/s")
    report.add("engine / offline, RAG mix 8-input jobs", served / off16, "x", ">= 1.0")
    report.add("engine / offline, 1-input short queries", single / off_short, "x", ">= 0.9")
    if ort_rate:
        report.add("onnxruntime CUDA fp16 / torch fp16 offline", ort_rate / off16, "x")
    report.write()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
