"""Shared fixtures: tiny models, a models.yaml, and real uvicorn servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from embedsvc.api import create_app
from embedsvc.engine import EngineSet, load_engines
from embedsvc.metrics import Metrics
from embedsvc.registry import Registry, load_registry
from embedsvc.server import _uvicorn_config
from embedsvc.settings import Settings
from tests.models import (
    MINILM_PATH,
    build_tiny_bert,
    build_tiny_cross_encoder,
    build_tiny_splade,
    write_models_yaml,
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    bge = build_tiny_bert(root / "tiny-bge", pooling="cls", seed=1, max_seq_length=64)
    nomic = build_tiny_bert(root / "tiny-nomic", pooling="mean", seed=2, shift_bias=True)
    big = build_tiny_bert(root / "tiny-bigvocab", pooling="mean", seed=3, extra_vocab=100_000)
    reranker = build_tiny_cross_encoder(root / "tiny-reranker", seed=4)
    splade = build_tiny_splade(root / "tiny-splade", seed=5)
    write_models_yaml(root / "models.yaml", bge, nomic, big, reranker, splade)
    return root


@pytest.fixture(scope="session")
def registry(model_dir: Path) -> Registry:
    return load_registry(model_dir / "models.yaml")


@pytest.fixture(scope="session")
def st_minilm() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM_PATH), device="cpu", local_files_only=True)


# API tests run twice in these modules: through embedsvc's HTTP protocol with its direct
# route, and through uvicorn's own protocol (--no-http-direct, and what serves when the
# installed uvicorn lacks what the direct route needs).
BOTH_PROTOCOLS = {
    "test_clients",
    "test_errors",
    "test_hostile",
    "test_rerank",
    "test_similarity",
    "test_sparse",
    "test_tei_contract",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if "http_direct" in metafunc.fixturenames and module in BOTH_PROTOCOLS:
        metafunc.parametrize(
            "http_direct", [True, False], ids=["direct", "stock"], indirect=True, scope="session"
        )


@pytest.fixture(scope="session")
def http_direct(request: pytest.FixtureRequest) -> bool:
    """Settings.http_direct of the test servers (True but in BOTH_PROTOCOLS modules)."""
    return bool(getattr(request, "param", True))


@dataclass
class Server:
    url: str
    engines: EngineSet
    metrics: Metrics
    settings: Settings
    app: Any = None  # what uvicorn runs

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def run_server(
    registry: Registry,
    models: list[str],
    wrap: Callable[[Any], Any] | None = None,
    **overrides: Any,
) -> Iterator[Server]:
    """Load `models`, serve them with uvicorn on a free loopback port, stop afterwards.
    `wrap(app)` may put another ASGI app around embedsvc's."""
    settings = Settings(**overrides)
    metrics = Metrics()
    engines = load_engines(registry.select(models), settings, metrics)
    app = create_app(settings, metrics, engines=engines)
    if wrap is not None:
        app = wrap(app)
    sock = free_socket()
    port = sock.getsockname()[1]
    config = _uvicorn_config(app, settings, lifespan="on")  # as `embedsvc serve` runs it
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", engines, metrics, settings, app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engines.stop()
        sock.close()


@pytest.fixture(scope="session")
def server(registry: Registry, http_direct: bool) -> Iterator[Server]:
    """One server with all the test models (MiniLM is the default)."""
    models = ["all-minilm-l6-v2", "tiny-bge", "tiny-nomic", "tiny-e5"]
    with run_server(registry, models, http_direct=http_direct) as s:
        yield s


@pytest.fixture()
def server_factory(registry: Registry, http_direct: bool) -> Callable[..., Any]:
    """Start a dedicated server with other settings: `with server_factory(models, **kw)`."""

    def make(models: list[str] | None = None, **overrides: Any) -> Any:
        overrides.setdefault("http_direct", http_direct)
        return run_server(registry, models or ["all-minilm-l6-v2"], **overrides)

    return make


def cosine(a: Any, b: Any) -> float:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedsvc", "serve", "--port", str(self.port), *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Several front ends: the first 200 may come from one while another is still
        # connecting to the engine (its requests get 503 "still loading"), so then wait
        # for 16 connections opened at once, which every front end shares, all to say 200.
        probes = (
            16 if "--api-workers" in args and args[args.index("--api-workers") + 1] != "1" else 1
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if all(code == 200 for code in _health(self.url, probes)):
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.proc.communicate()[0]
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return self.proc.returncode, out


def _health(url: str, connections: int) -> list[int]:
    """/health's status on `connections` connections opened at once."""

    async def probe() -> list[int]:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=2, limits=limits) as c:
            answers = await asyncio.gather(*(c.get("/health") for _ in range(connections)))
        return [r.status_code for r in answers]

    return asyncio.run(probe())


@pytest.fixture()
def spawn() -> Iterator[Any]:
    started: list[ServerProcess] = []

    def make(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        p = ServerProcess(*args, env=env)
        started.append(p)
        return p

    yield make
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.communicate()
