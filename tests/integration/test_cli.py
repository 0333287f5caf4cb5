"""The `embedsvc` command as a user runs it: a real process on a loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support import free_socket
from tests.support.models import MINILM_PATH

EMBEDSVC = [sys.executable, "-m", "embedsvc"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["HF_HUB_OFFLINE"] = "1"
    e.pop("EMBEDSVC_PORT", None)
    return e


def test_serve_default_model_end_to_end() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [*EMBEDSVC, "serve", "--port", str(port)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    statuses = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                code = httpx.get(url + "/health", timeout=2).status_code
            except httpx.TransportError:
                code = 0
            statuses.append(code)
            if code == 200:
                break
            time.sleep(0.1)
        assert statuses[-1] == 200, statuses[-10:]
        assert set(statuses) <= {0, 503, 200}
        r = httpx.post(url + "/embed", content=b'{"inputs":"hello"}', timeout=30)
        vec = np.array(r.json())
        assert vec.shape == (1, 384)
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "all-minilm-l6-v2" in out and f"http://127.0.0.1:{port}" in out


def test_bad_models_file_stops_start_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - name: m\n    hf_id: org/m\n    revision: main\n")
    proc = subprocess.run(
        [*EMBEDSVC, "serve", "--models-file", str(bad)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "revision 'main' is not a 40-hex commit SHA" in proc.stderr


def test_model_that_cannot_load_stops_start_with_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(MINILM_PATH, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    cfg = tmp_path / "models.yaml"
    cfg.write_text(
        "models:\n  - name: pickled\n    hf_id: org/p\n"
        "    revision: 1110a243fdf4706b3f48f1d95db1a4f5529b4d41\n    local_dir: pickled\n"
    )
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.run(
        [*EMBEDSVC, "serve", "--models-file", str(cfg), "--models", "pickled", "--port", str(port)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2  # a configuration error, told before anything loads
    assert "model pickled" in proc.stderr and "only pickle weights" in proc.stderr
    assert "listening on" not in proc.stderr


def test_models_command_lists_registry() -> None:
    proc = subprocess.run(
        [*EMBEDSVC, "models"], env=env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "all-minilm-l6-v2" in proc.stdout and "(default)" in proc.stdout
    assert "nomic-ai/nomic-embed-text-v1.5@e9b6763023c6" in proc.stdout


def test_commands_read_the_models_file_from_the_environment(model_dir: Path) -> None:
    """`models`, `pull` and `export` take EMBEDSVC_MODELS_FILE / EMBEDSVC_MODELS like
    `serve` does."""
    e = {**env(), "EMBEDSVC_MODELS_FILE": str(model_dir / "models.yaml")}
    proc = subprocess.run([*EMBEDSVC, "models"], env=e, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "tiny-e5" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [*EMBEDSVC, "pull"],
        env={**e, "EMBEDSVC_MODELS": "tiny-bge"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model tiny-bge comes from local_dir; nothing to pull" in proc.stderr


def test_batch_budget_below_max_seq_length_stops_start() -> None:
    proc = subprocess.run(
        [*EMBEDSVC, "serve", "--max-batch-tokens", "100", "--port", "0"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "max_batch_tokens (100) is below its max_seq_length (256)" in proc.stderr


def test_threads_setting_reaches_the_served_process(spawn: Any) -> None:
    srv = spawn("--threads", "1")
    assert httpx.get(srv.url + "/info").json()["threads"] == 1
    assert httpx.post(srv.url + "/embed", json={"inputs": "one thread"}).status_code == 200
    default = spawn()
    from embedsvc.settings import available_cpus

    assert httpx.get(default.url + "/info").json()["threads"] == available_cpus()
