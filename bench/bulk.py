"""`embedsvc embed` against SentenceTransformer.encode on the same texts, and its memory
over a million rows.

    python bench/bulk.py                       # ratio on 6,000 RAG-mix rows (bundled MiniLM)
    python bench/bulk.py --rss-rows 1000000    # plus resident memory over a million rows
                                               # (a near-free 2-layer model, so it takes minutes)

Ratio: both sides embed the same texts, each timed without model loading: `encode` at each
batch size in --batch-sizes (its best counts), `embedsvc embed` as a subprocess (the rows/s
its manifest records for the run, which excludes start-up; the wall time with start-up is
printed too). Memory: the resident set of the `embedsvc embed` process, sampled every second
from /proc, at 10%, 50% and 100% of the rows.

    python bench/bulk.py --device cuda --model bge-small-en-v1.5 --random-weights \
        --rows 200000 --batch-sizes 128,256,512 --usd-per-hour 3.5 --report gpu.json

on a GPU: both sides in float16 (the server's dtype auto there), the model's architecture
with random weights (bench/gpu_models.py), and what embedding a million chunks costs at the
hourly price given; the figures go into bench/gpu.sh's report (bench/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import Report
from throughput import model_dir, offline_limit
from workload import rag_mix


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_embed(
    src: Path, out: Path, extra: list[str]
) -> tuple[dict, float, list[tuple[float, float]]]:
    """Run `embedsvc embed`; its manifest summary, wall seconds and (rows done, RSS MB)."""
    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "embed",
        str(src),
        "--output",
        str(out),
        "--overwrite",
        "--log-level",
        "warning",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    samples: list[tuple[float, float]] = []
    manifest = out / "_manifest.json"
    while proc.poll() is None:
        time.sleep(1.0)
        rows = 0.0
        with contextlib.suppress(OSError, ValueError, KeyError):
            rows = sum(s["input_rows"] for s in json.loads(manifest.read_text())["shards"])
        samples.append((rows, rss_mb(proc.pid)))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"embedsvc embed exited {proc.returncode}")
    return json.loads(manifest.read_text())["summary"], wall, samples


def tiny_models_file(folder: Path) -> Path:
    from tests.support.models import build_tiny_bert

    build_tiny_bert(folder / "tiny", pooling="mean", seed=1)
    path = folder / "models.yaml"
    path.write_text(
        "default_models: [tiny]\nmodels:\n  - name: tiny\n    hf_id: bench/tiny\n"
        f"    revision: '{'0' * 40}'\n    local_dir: {folder / 'tiny'}\n    pooling: mean\n"
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=6000, help="rows for the ratio (0: skip it)")
    ap.add_argument("--batch-sizes", default="16,32,64,128")
    ap.add_argument("--rss-rows", type=int, default=0, help="rows for the memory run (0: none)")
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--random-weights", action="store_true", help="see bench/gpu_models.py")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer files for --random-weights")
    ap.add_argument("--device", default="cpu", help="cuda: float16 on both sides")
    ap.add_argument("--usd-per-hour", type=float, help="the machine's price: cost of 1M rows")
    ap.add_argument("--report", type=Path, help="add the figures to this JSON (and its .md)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="embedsvc-bulk-"))
    chosen: list[str] = ["--model", args.model]
    if args.random_weights:
        from gpu_models import build_all

        models_file = build_all(work / "models", [args.model], args.tokenizer)
        chosen += ["--models-file", str(models_file)]
        from embedsvc.model_files import resolve_model_dir
        from embedsvc.registry import load_registry

        path = str(resolve_model_dir(load_registry(models_file).select([args.model])[0]))
    else:
        path = model_dir(args.model)
    if args.rows:
        texts = rag_mix(args.rows, seed=1, passage_words=(30, 120))
        src = work / "corpus.jsonl"
        write_jsonl(src, texts)
        print(f"{args.rows} RAG-mix rows (half short queries, half passages of 30-120 words)")
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        if args.device == "cpu":
            bs, st_rate = offline_limit(path, texts, sizes)
        else:
            import torch
            from gpu_check import offline
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(
                path, device=args.device, model_kwargs={"dtype": torch.float16}
            )
            bs, st_rate = offline(st, texts, sizes)
            del st
            torch.cuda.empty_cache()
        summary, wall, _ = run_embed(src, work / "out", chosen)
        ours = summary["this_run_rows_per_second"]
        seconds, tokens_s = summary["this_run_seconds"], summary["this_run_tokens_per_second"]
        print(
            f"  embedsvc embed: {ours:8.1f} rows/s ({seconds:.1f} s; {wall:.1f} s with "
            f"start-up), {tokens_s:.0f} tokens/s"
        )
        print(f"ratio embedsvc embed / best encode (batch {bs}): {ours / st_rate:.2f}")
        report = Report(args.report, "bulk")
        report.fact("bulk", f"{args.rows} RAG-mix rows, {args.model}, {args.device}")
        report.add(f"encode, best batch ({bs})", st_rate, "rows/s")
        report.add("embedsvc embed", ours, "rows/s")
        report.add("embedsvc embed / encode", ours / st_rate, "x", ">= 1.0")
        if args.usd_per_hour:
            cost = 1e6 / ours / 3600 * args.usd_per_hour
            print(f"1M rows at ${args.usd_per_hour:.2f}/hour: ${cost:.3f}")
            report.add(f"1M rows at ${args.usd_per_hour:.2f} an hour", cost, "USD")
        report.write()
    if args.rss_rows:
        big = work / "million.jsonl"
        write_jsonl(big, rag_mix(args.rss_rows, seed=2, passage_words=(30, 120)))
        models = tiny_models_file(work)
        summary, wall, samples = run_embed(big, work / "out-big", ["--models-file", str(models)])
        print(
            f"{args.rss_rows:,} rows, near-free model: {summary['this_run_rows_per_second']:.0f} "
            f"rows/s, {wall:.0f} s"
        )
        for share in (0.1, 0.5, 1.0):
            target = share * args.rss_rows
            rss = next((m for rows, m in samples if rows >= target), samples[-1][1])
            print(f"  RSS after {share:4.0%} of the rows: {rss:7.1f} MB")
        print(f"  RSS peak: {max(m for _, m in samples):.1f} MB")


if __name__ == "__main__":
    main()
