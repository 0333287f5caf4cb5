"""`embedsvc serve`: load the registry, start uvicorn, load models behind /health, drain
on SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from embedsvc import __version__
from embedsvc.api import create_app
from embedsvc.api.service import Service
from embedsvc.engine import load_engines
from embedsvc.logs import setup_logging
from embedsvc.metrics import Metrics
from embedsvc.registry import load_registry
from embedsvc.settings import Settings

log = logging.getLogger("embedsvc")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: mark the service as draining (readiness and new requests get
    503), then let uvicorn stop accepting connections and wait for in-flight requests (at
    most drain_timeout seconds) before the engines stop."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.service.draining:
            log.info("signal %d: draining in-flight requests, then exiting", sig)
        self.service.draining = True
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_format)
    registry = load_registry(settings.models_file or None)
    specs = registry.select(settings.model_names())
    for spec in specs:
        log.info("model %s: %s@%s (source: %s)", spec.name, spec.hf_id, spec.revision, spec.source)
    settings.api_keys()  # a missing or empty key file stops start-up here
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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=settings.drain_timeout,
    )
    server = DrainingServer(config, app.state.service)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("embedsvc %s listening on http://%s:%d", __version__, host, settings.port)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so the default handler
    # kills the process; with these no-op handlers in place, a clean drain exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failures:
        print(f"embedsvc: {failures[0]}", file=sys.stderr)
        return 1
    return 0
