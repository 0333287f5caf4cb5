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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="embedsvc-bulk-"))
    if args.rows:
        texts = rag_mix(args.rows, seed=1, passage_words=(30, 120))
        src = work / "corpus.jsonl"
        write_jsonl(src, texts)
        print(f"{args.rows} RAG-mix rows (half short queries, half passages of 30-120 words)")
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        bs, st_rate = offline_limit(model_dir("all-minilm-l6-v2"), texts, sizes)
        summary, wall, _ = run_embed(src, work / "out", [])
        ours = summary["this_run_rows_per_second"]
        seconds, tokens_s = summary["this_run_seconds"], summary["this_run_tokens_per_second"]
        print(
            f"  embedsvc embed: {ours:8.1f} rows/s ({seconds:.1f} s; {wall:.1f} s with "
            f"start-up), {tokens_s:.0f} tokens/s"
        )
        print(f"ratio embedsvc embed / best encode (batch {bs}): {ours / st_rate:.2f}")
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
