"""Every script in bench/ still runs: the benchmarks import engine internals, and nothing
else would notice when a change breaks them. Each is run on a tiny input (the ones that
take minutes at any size, or need wrk, a GPU or a peer server, are started with --help,
which runs their imports and argument set-up). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

# script -> arguments of a tiny run; None: --help (why, in the comment)
RUNS: dict[str, list[str] | None] = {
    "loaders.py": ["--seconds", "0.05"],
    "loop_cost.py": ["--requests", "400", "--zero-passes"],
    "bulk.py": ["--rows", "40", "--batch-sizes", "16"],
    "gpu_check.py": ["--device", "cpu", "--quick", "--texts", "64", "--seconds", "0.1"],
    "decoder.py": ["--layers", "2", "--hidden", "64", "--texts", "16", "--seconds", "1"],
    "multivector.py": ["--layers", "2", "--hidden", "64", "--texts", "64", "--seconds", "1"],
    "colbert.py": ["--layers", "2", "--hidden", "64", "--texts", "32", "--seconds", "1"],
    "backends.py": None,  # exports the model to ONNX fp32 and int8 first (minutes)
    "frontend.py": None,  # wrk against several servers, rounds of seconds each
    "throughput.py": None,  # several servers, load runs of seconds each
    "gpu_serve.py": None,  # wrk, and a server per configuration
    "gpu_models.py": None,  # writes several real architectures with random weights
    "overload.py": None,  # a server pushed past saturation on purpose
    "peer_infinity.py": None,  # needs the infinity_emb peer installed
    "policies.py": None,  # two servers, turns of tens of seconds
    "rerank.py": None,  # downloads nothing, but times seconds per batch size
    "soak.py": None,  # minutes by design
    "startup.py": None,  # starts the server --runs times
    "cache.py": None,  # wrk against two servers, rounds of seconds each
    "ab_frontend.py": None,  # two servers from two source trees, wrk in rounds
    "matrix_units.py": None,  # wrk against two servers, offline engines at three batch sizes
    "shapes.py": None,  # builds two models of 0.6B parameters with random weights
}
MODULES = ("bare_app", "naive_server", "workload", "report")  # imported by the scripts above


def test_every_bench_script_is_listed() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts == set(RUNS) | {f"{m}.py" for m in MODULES}


# gpu_check.py runs once, in test_gpu_check_dry_run_writes_its_report (with its report
# checked): a second run of the same 40 seconds would test nothing more.
@pytest.mark.parametrize("script", sorted(set(RUNS) - {"gpu_check.py"}))
def test_bench_script_runs(script: str) -> None:
    args = RUNS[script] or ["--help"]
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.strip(), "it printed nothing"


def test_bench_modules_import() -> None:
    code = "import sys; sys.path.insert(0, 'bench'); " + "; ".join(f"import {m}" for m in MODULES)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def test_gpu_check_dry_run_writes_its_report(tmp_path: Path) -> None:
    """bench/gpu.sh's first script, as a dry run on the CPU: every figure in one JSON with
    the targets judged, and the markdown table beside it."""
    report = tmp_path / "gpu.json"
    args = RUNS["gpu_check.py"] or []
    r = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), *args, "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["facts"]["device"] == "none (dry run on CPU)"
    figures = {f["name"]: f for f in data["figures"]}
    parity = figures["torch fp16 vs fp32: cosine min"]
    assert parity["target"] == ">= 0.999" and parity["met"] is True
    ratio = figures["engine / offline, 1-input short queries"]
    assert ratio["value"] > 0 and ratio["met"] == (ratio["value"] >= 0.9)
    table = report.with_suffix(".md").read_text()
    assert "| gpu_check | engine / offline, 1-input short queries |" in table
    assert r.stdout.strip(), "it printed nothing"
