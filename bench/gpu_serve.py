"""Single-input short queries over HTTP against the GPU's offline limit of the same model
(not part of the tests; for a machine with an NVIDIA GPU and wrk).

    python bench/gpu_serve.py [--model bge-small-en-v1.5] [--api-workers 1,0]
    python bench/gpu_serve.py --random-weights       # no download: the architecture alone

In one run: the offline limit (SentenceTransformer.encode in fp16 at its best batch size
over the same short queries), then `embedsvc serve` (fp16, one engine process and
--api-workers front ends; 0 = auto; with --no-graphs-too each also without CUDA graphs)
under wrk with one short query per request, as requests/s and their ratio to that limit,
with CPU milliseconds per request of the front ends and the engine, forward passes and
their mean size (/metrics), the GPU's mean utilization (nvidia-smi) and latency at
concurrency 1; then 32-input requests of the RAG mix (32 connections) against the offline
limit of the RAG mix. --report PATH adds every figure to that JSON and its markdown table
(bench/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from frontend import LUA, load_server, show, write_bodies
from gpu_check import offline
from report import Report
from throughput import Load, closed_loop, free_port, start, stop
from workload import queries, rag_mix


class GpuUtilization:
    """Mean GPU utilization (%) from nvidia-smi samples while in the `with` block."""

    def __init__(self) -> None:
        self.mean: float | None = None

    def __enter__(self) -> GpuUtilization:
        cmd = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:
            self._proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate()
        samples = [float(x) for x in out.split() if x.replace(".", "").isdigit()]
        self.mean = statistics.fmean(samples) if samples else None


def server_stats(port: int) -> dict[str, float]:
    """Totals so far from the server's /metrics: forward passes and the inputs in them,
    requests and their seconds queued and in forward passes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    stats = dict.fromkeys(("passes", "inputs", "requests", "queue", "inference"), 0.0)
    names = {
        "embedsvc_batch_size_count": "passes",
        "embedsvc_batch_size_sum": "inputs",
        "embedsvc_request_duration_seconds_count": "requests",
        "embedsvc_request_duration_seconds_sum": "",
    }
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = names.get(name)
        if key is None:
            continue
        phase = line.split('phase="', 1)[1].split('"', 1)[0] if 'phase="' in line else ""
        if key == "requests" and phase != "inference":
            continue
        if key == "" and phase not in ("queue", "inference"):
            continue
        stats[key or phase] += float(line.rsplit(" ", 1)[1])
    return stats


def main() -> int:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedsvc.model_files import resolve_model_dir
    from embedsvc.registry import load_registry

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="bge-small-en-v1.5")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer files for --random-weights")
    ap.add_argument("--api-workers", default="1,0", help="comma-separated; 0 = auto")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--threads", type=int, default=4, help="wrk threads")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    ap.add_argument("--report", type=Path, help="add every figure to this JSON (and its .md)")
    ap.add_argument("--texts", type=int, default=4096, help="short queries, and RAG-mix texts")
    ap.add_argument(
        "--no-graphs-too",
        action="store_true",
        help="run each --api-workers setting also with --no-cuda-graphs (side by side)",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/gpu_serve.py needs wrk: apt-get install wrk")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    dtype = "float16" if args.device == "cuda" else "float32"
    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-gpu-serve-"))
    models_file = ""
    if args.random_weights:
        from gpu_models import build_all

        models_file = str(
            build_all(tmp / "models", [args.model], args.tokenizer, device=args.device, dtype=dtype)
        )
    spec = load_registry(models_file or None).select([args.model])[0]
    path = resolve_model_dir(spec)
    short = queries(args.texts, seed=22)
    mix = rag_mix(args.texts, seed=21)
    lua = tmp / "bodies.lua"
    lua.write_text(LUA)
    bodies = write_bodies(tmp, "short", short, 1)
    mix_bodies = write_bodies(tmp, "mix32", mix, 32)
    report = Report(args.report, "gpu_serve")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (dry run on CPU)"
    print(
        f"GPU: {gpu}; {os.cpu_count()} CPUs; model {args.model}"
        f"{' (random weights)' if args.random_weights else ''}; wrk -t{args.threads} "
        f"-c{args.connections}, {args.seconds:.0f} s runs"
    )

    kwargs = {"dtype": getattr(torch, dtype)}
    model = SentenceTransformer(str(path), device=args.device, model_kwargs=kwargs)
    print(f"offline limit, torch {dtype}, the same short queries:")
    best_bs, limit = offline(model, short, [64, 128, 256, 512, 1024])
    print(f"offline limit, torch {dtype}, the RAG mix:")
    mix_bs, mix_limit = offline(model, mix, [32, 64, 128, 256])
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()

    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "serve",
        "--models",
        args.model,
        "--log-level",
        "warning",
        "--max-queue-time",
        "0",  # saturation: queue, do not refuse (admission has its own benchmark)
    ]
    if models_file:
        cmd += ["--models-file", models_file]
    results = []
    graphs = [True, False] if args.no_graphs_too else [True]
    runs = [(int(w), g) for w in args.api_workers.split(",") for g in graphs]
    try:
        for workers, graph in runs:
            port = free_port()
            extra = ["--api-workers", str(workers)] + (
                ["--cuda-graphs"] if graph else ["--no-cuda-graphs"]
            )
            proc = start([*cmd, "--port", str(port), *extra], port)
            try:
                url = f"http://127.0.0.1:{port}/embed"
                before = server_stats(port)
                with GpuUtilization() as util:
                    r = load_server(
                        url, proc.pid, bodies, lua, args.seconds, 3, args.connections, args.threads
                    )
                after = server_stats(port)
                d = {k: after[k] - before[k] for k in after}
                n, per = d["passes"], max(d["requests"], 1)
                label = f"--api-workers {workers or 'auto'}"
                label += "" if graph else " --no-cuda-graphs"
                show(label, r)
                busy = f"{util.mean:.0f}%" if util.mean is not None else "?"
                queued, inside = d["queue"] / per * 1e3, d["inference"] / per * 1e3
                print(
                    f"  {label}: {n:.0f} forward passes, {d['inputs'] / max(n, 1):.1f} inputs "
                    f"each; per request {queued:.2f} ms queued, {inside:.2f} ms in its pass "
                    "(warm-up included)"
                )
                one = asyncio.run(closed_loop(url.removesuffix("/embed"), Load(short, 1), 1, 5))
                print(
                    f"  {label}: GPU utilization {busy}; concurrency 1: p50 "
                    f"{one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms, in the server "
                    f"outside the forward pass p50 {one['internal_p50_ms']:.2f} ms"
                )
                results.append((label, r["rps"], r["errors"] or r["socket_errors"]))
                report.add(f"{label}: 1-input short queries", r["rps"], "requests/s")
                if util.mean is not None:
                    report.add(f"{label}: GPU utilization", util.mean, "%")
                report.add(f"{label}: p50 at concurrency 1", one["p50_ms"], "ms")
                conns = min(32, args.connections)
                m = load_server(url, proc.pid, mix_bodies, lua, args.seconds, 3, conns, 1)
                show(f"{label}, 32-input RAG mix x{conns}", m, 32)
                ratio = m["rps"] * 32 / mix_limit
                name = f"{label}: 32-input RAG mix / offline"
                if m["errors"] or m["socket_errors"]:
                    print(f"  {name} = {ratio:.2f}  (RUN HAD ERRORS: does not count)")
                    report.add(name + " (the run had errors: does not count)", ratio, "x")
                else:
                    print(f"  {name} = {ratio:.2f}")
                    report.add(name, ratio, "x", ">= 1.0")
            finally:
                stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"offline limit ({dtype}, batch {best_bs}): {limit:.0f} short queries/s")
    print(f"offline limit ({dtype}, batch {mix_bs}): {mix_limit:.0f} RAG-mix inputs/s")
    report.fact("gpu_serve", f"wrk -t{args.threads} -c{args.connections}, {args.seconds:.0f} s")
    report.add(f"offline {dtype}, short queries (batch {best_bs})", limit, "inputs/s")
    report.add(f"offline {dtype}, RAG mix (batch {mix_bs})", mix_limit, "inputs/s")
    for label, rps, errors in results:
        note = "  (RUN HAD ERRORS: does not count)" if errors else ""
        print(
            f"ratio 1-input short queries over HTTP, {label} / offline = {rps / limit:.2f} "
            f"({rps:.0f} requests/s){note}"
        )
        name = f"{label}: 1-input short queries / offline"
        if errors:
            report.add(name + " (the run had errors: does not count)", rps / limit, "x")
        else:
            report.add(name, rps / limit, "x", ">= 0.9")
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
