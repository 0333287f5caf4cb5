"""What the tests share besides fixtures (tests/conftest.py): servers in this process
(`run_server`) and in their own (`ServerProcess`), raw HTTP on a socket, a backend spec
for tiny model folders, and cosine similarity. Model builders: support/models.py; a
Hugging Face Hub stand-in: support/hub_emulator.py."""

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
from typing import Any

import httpx
import uvicorn

from embedsvc.api import create_app
from embedsvc.backends.base import BackendSpec
from embedsvc.engine import EngineSet, load_engines
from embedsvc.metrics import Metrics
from embedsvc.registry import Registry
from embedsvc.server import _uvicorn_config
from embedsvc.settings import Settings


@dataclass
class Server:
    url: str
    engines: EngineSet
    metrics: Metrics
    settings: Settings
    app: Any = None  # what uvicorn runs
    uvicorn: Any = None  # the uvicorn.Server (its server_state: the open connections)

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
    `wrap(app)` may put another ASGI app around embedsvc's. In float32 unless `dtype` is
    given: the tests compare with float32 references at 1e-5 on whatever CPU runs them
    (dtype auto picks bfloat16 on one with bf16 units; tests/api/test_dtype_auto.py)."""
    overrides.setdefault("dtype", "float32")
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
        yield Server(f"http://127.0.0.1:{port}", engines, metrics, settings, app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engines.stop()
        sock.close()


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
                if all(code == 200 for code in health_statuses(self.url, probes)):
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


def health_statuses(url: str, connections: int) -> list[int]:
    """/health's status on `connections` connections opened at once."""

    async def probe() -> list[int]:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=2, limits=limits) as c:
            answers = await asyncio.gather(*(c.get("/health") for _ in range(connections)))
        return [r.status_code for r in answers]

    return asyncio.run(probe())


def read_responses(s: socket.socket, n: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """`n` responses (status line, headers, body) read off a socket, by content-length."""
    buf = b""
    out = []
    while len(out) < n:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = buf[:head_end].split(b"\r\n")
            headers = dict(line.split(b": ", 1) for line in lines[1:])
            length = int(headers[b"content-length"])
            end = head_end + 4 + length
            if len(buf) >= end:
                out.append((lines[0], headers, buf[head_end + 4 : end]))
                buf = buf[end:]
                continue
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {len(out)} of {n} responses"
        buf += chunk
    return out


def raw_post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s" % (path, len(body), extra, body)
    )


def raw_connect(server: Any) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def spec(name: str, **kw: object) -> BackendSpec:
    base: dict[str, object] = dict(
        name=name,
        hf_id="test/" + name,
        revision="0" * 40,
        backend="torch",
        device="cpu",
        dtype="float32",
        pooling=None,
        max_seq_length=None,
        trust_remote_code=False,
        onnx_variant="",
        onnx_dir=None,
    )
    base.update(kw)
    return BackendSpec(**base)  # type: ignore[arg-type]


def wait_for(cond: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """Poll `cond` until it holds (the observable state a test waits for, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.02)


async def until(cond: Callable[[], Any], timeout: float = 60, what: str = "condition") -> None:
    """`wait_for` inside a test's event loop; `cond` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        held = cond()
        if asyncio.iscoroutine(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        await asyncio.sleep(0.02)


def metric_value(text: str, name: str) -> float:
    """A sample's value in /metrics' text (0 when absent)."""
    import re

    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def admitted_inputs(url: str, model: str = "all-minilm-l6-v2") -> float:
    """Inputs the server has admitted so far, from its /metrics: those in flight and those
    embedded (a count that only grows, unlike either alone)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    label = f'{{model="{model}"}}'
    inflight = metric_value(text, f"embedsvc_inflight_inputs{label}")
    return inflight + metric_value(text, f"embedsvc_inputs_total{label}")


async def refused_after_signal(url: str, timeout: float = 10) -> Any:
    """New connections to a server told to stop: each gets 503 while it still listens,
    until its shutdown closes the listening socket; then "refused". Anything else (a 200,
    another status) is returned as it came, for the test to fail on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as c:
                status = (await c.post("/embed", json={"inputs": "late"})).status_code
        except httpx.TransportError:
            return "refused"
        if status != 503:
            return status
        await asyncio.sleep(0.02)
    return "still listening"


def rows_close(got: Any, expected: Any, floor: float = 0.9999) -> None:
    """Row by row, the cosine of `got` and `expected` is at least `floor`."""
    import numpy as np

    a, b = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape
    cosines = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosines.min() >= floor, cosines
