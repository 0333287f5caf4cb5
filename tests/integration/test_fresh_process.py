"""What only a fresh interpreter shows: which libraries start-up imports, and the thread
count warm-up decides with a CPU hog beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_bert_models_start_without_transformers(model_dir: Path) -> None:
    """Start-up: serving MiniLM and the tiny BERTs imports neither transformers nor
    sentence-transformers (seconds of imports)."""
    code = (
        "import sys\n"
        "from embedsvc.registry import load_registry\n"
        "from embedsvc.settings import Settings\n"
        "from embedsvc.metrics import Metrics\n"
        "from embedsvc.engine import load_engines\n"
        f"r = load_registry({str(model_dir / 'models.yaml')!r})\n"
        "e = load_engines(r.select(['all-minilm-l6-v2', 'tiny-bge']), Settings(), Metrics())\n"
        "print(sorted(m for m in ('transformers', 'sentence_transformers') if m in sys.modules))\n"
        "e.stop()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_a_busy_neighbour_at_start_up_leaves_minilm_its_threads(model_dir: Path) -> None:
    """Warm-up times a pass on one thread and on all: a model that gains nothing (the
    near-free tiny BERT) runs on one. A CPU hog beside it at that moment (another server
    loading) made MiniLM look no faster on two threads, and it then ran on one for good,
    at about 0.6x its throughput under load. Now only a cheap pass can lose its threads."""
    code = (
        "import torch\n"
        "from embedsvc.engine.models import load_workers\n"
        "from embedsvc.metrics import Metrics\n"
        "from embedsvc.registry import load_registry\n"
        "from embedsvc.settings import Settings\n"
        f"r = load_registry({str(model_dir / 'models.yaml')!r})\n"
        "for name in ('all-minilm-l6-v2', 'tiny-bge'):\n"
        "    w = load_workers(r.select([name]), Settings(), Metrics())[name]\n"
        "    print(name, w.one_thread_enough, torch.get_num_threads())\n"
        "    w.stop()\n"
    )
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    finally:
        hog.kill()
        hog.wait()
    assert out.returncode == 0, out.stderr
    decided = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert decided["all-minilm-l6-v2"].split()[0] == "False"
    assert int(decided["all-minilm-l6-v2"].split()[1]) > 1
    assert decided["tiny-bge"].split()[0] == "True"  # a near-free model gains nothing
