"""The `embedsvc` command as a user runs it: a real process on a loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from tests.conftest import free_socket
from tests.models import MINILM_PATH

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
        env=env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
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
        [*EMBEDSVC, "serve", "--models-file", str(cfg), "--models", "pickled", "--port",
         str(port)],
        env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "model pickled" in proc.stderr and "only pickle weights" in proc.stderr


def test_models_command_lists_registry() -> None:
    proc = subprocess.run(
        [*EMBEDSVC, "models"], env=env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "all-minilm-l6-v2" in proc.stdout and "(default)" in proc.stdout
    assert "nomic-ai/nomic-embed-text-v1.5@e9b6763023c6" in proc.stdout
