"""`embedsvc serve`: load the registry, start uvicorn, load models behind /health, drain
on SIGTERM.

Two layouts (`--api-workers`):
- one process: uvicorn, the front end and the model workers share it;
- N front-end processes and this process as the engine: it binds the port, starts the
  front ends (each runs uvicorn on the shared socket, validates, tokenizes and answers),
  loads the models and serves them over ZeroMQ (engine/remote.py). It restarts a front
  end that dies, forwards SIGTERM so each drains its requests, and exits non-zero if a
  model cannot be loaded or its worker dies.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from embedsvc import __version__
from embedsvc.api import create_app
from embedsvc.api.cl100k import Cl100kDecoder
from embedsvc.api.service import Service
from embedsvc.engine import EngineSet, load_engines
from embedsvc.errors import UnhealthyError
from embedsvc.http.limits import ConnectionLimits
from embedsvc.http.uvicorn_check import http_protocol
from embedsvc.logs import setup_logging
from embedsvc.memory import settle_gc, tune_allocator
from embedsvc.metrics import Metrics, enable_multiprocess
from embedsvc.model_files import check_servable
from embedsvc.process import exit_now
from embedsvc.registry import ModelSpec, load_registry
from embedsvc.settings import Settings

log = logging.getLogger("embedsvc")

# A front end that dies this many times within RESTART_WINDOW seconds stops the server.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
# After the drain timeout, time for the 503s to be written before uvicorn cancels tasks.
DRAIN_GRACE = 5


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: mark the service as draining (readiness and new requests get
    503), then let uvicorn stop accepting connections and wait for in-flight requests (at
    most drain_timeout seconds) before the engines stop.

    In a front-end process it also exits when the engine process that started it is gone."""

    def __init__(self, config: uvicorn.Config, service: Service, parent: int = 0) -> None:
        super().__init__(config)
        self.service = service
        self.parent = parent

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.service.draining:
            log.info("signal %d: draining in-flight requests, then exiting", sig)
        self.service.draining = True
        super().handle_exit(sig, frame)  # type: ignore[arg-type]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown (stop accepting, wait for the requests in flight), with the
        drain timeout kept here: when it passes, every request still waiting for the
        engine is answered 503 in its dialect and its queued work dropped. uvicorn's own
        timeout, DRAIN_GRACE seconds later, would cancel the tasks (500s, tracebacks)."""
        timer = asyncio.get_running_loop().call_later(
            self.service.settings.drain_timeout, self._drain_expired
        )
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _drain_expired(self) -> None:
        engines = self.service.engines
        if engines is None:
            return
        timeout = self.service.settings.drain_timeout
        n = engines.front.abandon_all(
            lambda: UnhealthyError(
                f"the server is shutting down and its drain timeout ({timeout} s) passed "
                "before this request finished; retry it (on another replica)"
            )
        )
        if n:
            log.warning("drain timeout (%d s): %d requests unfinished, answered 503", timeout, n)

    async def on_tick(self, counter: int) -> bool:
        if self.parent and counter % 10 == 0 and os.getppid() != self.parent:
            log.error("the engine process has gone; exiting")
            self.service.draining = True
            self.should_exit = True
            if self.service.engines is not None:  # nothing will answer what is in flight
                self.service.engines.front.fail_all(UnhealthyError("the engine process has gone"))
        return await super().on_tick(counter)


def _quiet_signals() -> None:
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so the default handler
    # kills the process; with these no-op handlers in place, a clean drain exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def _ignore_signals() -> None:
    # Once drained, a repeated SIGTERM must not turn a clean exit into a kill: Python
    # restores the default handlers while it finalizes, but leaves ignored signals alone.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _uvicorn_config(app: Any, settings: Settings, **kw: Any) -> uvicorn.Config:
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_connections=settings.max_connections,
        write_timeout=settings.write_timeout,
        max_unsent_bytes=settings.max_unsent_bytes,
    )
    protocol = http_protocol(settings.http_direct, limits)
    if protocol == "httptools" and settings.max_connections:  # uvicorn's own cap: 503
        kw.setdefault("limit_concurrency", settings.max_connections)
    return uvicorn.Config(
        app,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=settings.drain_timeout + DRAIN_GRACE,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        http=protocol,  # one write per response, direct routes, bounds (http/)
        **kw,
    )


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_format)
    log.info("embedsvc %s settings: %s", __version__, settings.describe())
    # Each tokenizer call runs on the thread that makes it. The tokenizer library's own
    # thread pool spins up for every call, however small: on a busy server it took as
    # much CPU as the tokenizing itself, and front-end processes (and the tokenizer
    # threads in each) already give tokenizing its parallelism. Set the variable to keep
    # the library's pool.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    registry = load_registry(settings.models_file or None, settings.models_lock or None)
    specs = registry.select(settings.model_names())
    for spec in specs:
        log.info("model %s: %s@%s (source: %s)", spec.name, spec.hf_id, spec.revision, spec.source)
    check_servable(specs, settings.require_verified)  # before any model loads
    settings.api_keys()  # a missing or empty key file stops start-up here
    if settings.openai_token_ids == "cl100k":
        Cl100kDecoder.load()  # missing tiktoken or ranks stop start-up here, not in a worker
    log.info("memory allocator: %s", tune_allocator(settings.malloc))
    workers = settings.api_workers_for(_accelerated(specs))
    if workers > 1:
        return Supervisor(settings, specs, workers).run()
    return _serve_one_process(settings, specs)


def _accelerated(specs: list[ModelSpec]) -> bool:
    """Whether the models run on a GPU (then the front end needs cores of its own)."""
    if any(s.device == "cuda" for s in specs):
        return True
    if all(s.device == "cpu" for s in specs):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _serve_one_process(settings: Settings, specs: list[ModelSpec]) -> int:
    metrics = Metrics()
    failures: list[str] = []
    server: DrainingServer | None = None

    def on_failure(reason: str) -> None:
        """Loading failed or a worker died: exit non-zero so an orchestrator restarts us."""
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(
        settings,
        metrics,
        loader=lambda: load_engines(specs, settings, metrics, on_fatal=on_failure),
        on_load_failure=on_failure,
    )
    config = _uvicorn_config(app, settings, host=settings.host, port=settings.port)
    server = DrainingServer(config, app.state.service)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("embedsvc %s listening on http://%s:%d", __version__, host, settings.port)
    _quiet_signals()
    server.run()
    _ignore_signals()
    if failures:
        print(f"embedsvc: {failures[0]}", file=sys.stderr)
        return 1
    return 0


# ---- several processes -------------------------------------------------------------------


def run_frontend(
    settings: Settings, sock: socket.socket, address: str, identity: bytes, metrics_dir: str
) -> None:
    """Entry point of a front-end process (started by the Supervisor)."""
    from embedsvc.engine.remote import SILENCE, RemoteCore

    setup_logging(settings.log_level, settings.log_format)
    tune_allocator(settings.malloc)
    enable_multiprocess(metrics_dir)
    metrics = Metrics(multiprocess_dir=metrics_dir)

    async def connect() -> EngineSet:
        core = RemoteCore(address, identity)
        engines = EngineSet(await core.hello(), core, settings, metrics)
        core.on_silence = lambda: engines.front.fail_all(
            UnhealthyError(
                f"the engine process has not answered for {SILENCE:.0f} s; retry shortly "
                "or on another replica"
            ),
            cancel=True,
        )
        return engines

    app = create_app(settings, metrics, loader=connect)
    server = DrainingServer(_uvicorn_config(app, settings), app.state.service, os.getppid())
    _quiet_signals()
    server.run(sockets=[sock])
    _ignore_signals()
    exit_now(0)


class Supervisor:
    """This process as the engine, with `n` front-end processes on one listening socket."""

    def __init__(self, settings: Settings, specs: list[ModelSpec], n: int) -> None:
        self.settings = settings
        self.specs = specs
        self.n = n
        self.rundir = tempfile.mkdtemp(prefix="embedsvc-")
        self.address = f"ipc://{self.rundir}/engine"
        self.metrics_dir = os.path.join(self.rundir, "metrics")
        os.mkdir(self.metrics_dir)
        self.failures: list[str] = []
        self.draining = False
        self.procs: list[BaseProcess | None] = [None] * n
        self.identities: list[bytes] = [b""] * n
        self.generation = 0
        self.restarts: list[float] = []

    def run(self) -> int:
        from embedsvc.engine.models import load_workers
        from embedsvc.engine.remote import EngineServer

        enable_multiprocess(self.metrics_dir)
        metrics = Metrics(multiprocess_dir=self.metrics_dir)
        sock = self._bind()
        server = EngineServer(self.address)
        server.start()

        def load() -> None:
            try:
                workers = load_workers(self.specs, self.settings, metrics, self._fatal)
            except Exception as e:
                reason = f"model loading failed: {e}"
                log.error("%s", reason)
                server.failed(reason)
                self._fatal(reason)
                return
            server.loaded(workers)
            settle_gc()
            log.info("ready: %s", ", ".join(workers))

        threading.Thread(target=load, name="loader", daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        ctx = multiprocessing.get_context("spawn")
        for i in range(self.n):
            self._start(ctx, i, sock)
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        log.info(
            "embedsvc %s listening on http://%s:%d with %d front-end processes",
            __version__,
            host,
            sock.getsockname()[1],
            self.n,
        )
        try:
            self._watch(ctx, sock, server, metrics)
        finally:
            for p in self.procs:
                if p is not None and p.is_alive():
                    p.kill()
            _ignore_signals()
            server.stop()
            sock.close()
            shutil.rmtree(self.rundir, ignore_errors=True)
        if self.failures:
            print(f"embedsvc: {self.failures[0]}", file=sys.stderr)
            return 1
        return 0

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def _start(self, ctx: Any, i: int, sock: socket.socket) -> None:
        self.generation += 1
        identity = f"fe-{i}-{self.generation}".encode()
        p = ctx.Process(
            target=run_frontend,
            args=(self.settings, sock, self.address, identity, self.metrics_dir),
            name=f"embedsvc-frontend-{i}",
            daemon=False,
        )
        p.start()
        self.procs[i], self.identities[i] = p, identity

    def _fatal(self, reason: str) -> None:
        """Loading failed or a worker died: stop everything, exit non-zero."""
        self.failures.append(reason)

    def _on_signal(self, sig: int, frame: object) -> None:
        if not self.draining:
            log.info("signal %d: front ends drain their requests, then the engine exits", sig)
        self.draining = True
        for p in self.procs:
            if p is not None and p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def _watch(self, ctx: Any, sock: socket.socket, server: Any, metrics: Metrics) -> None:
        deadline: float | None = None
        while True:
            time.sleep(0.1)
            if self.failures and not self.draining:
                self._on_signal(signal.SIGTERM, None)
                deadline = time.monotonic() + 5  # nothing to drain for: the engine is gone
            if self.draining and deadline is None:
                deadline = time.monotonic() + self.settings.drain_timeout + 5
            for i, p in enumerate(self.procs):
                if p is None or p.is_alive():
                    continue
                assert p.pid is not None
                metrics.process_gone(p.pid)
                server.forget(self.identities[i])
                self.procs[i] = None
                if self.draining:
                    continue
                log.error("front-end process %d (pid %d) exited with %s", i, p.pid, p.exitcode)
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
                if len(self.restarts) > MAX_RESTARTS:
                    self._fatal(f"front-end processes died {len(self.restarts)} times in a minute")
                    continue
                self._start(ctx, i, sock)
            if all(p is None for p in self.procs):
                return
            if deadline is not None and time.monotonic() > deadline:
                log.error("front ends did not finish draining in time; stopping them")
                return
