"""What the routes share: the loaded engines (once loading finished) and the embed call
that drops a request's work when its client goes away."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.types import Receive

from embedsvc.api.cl100k import Cl100kDecoder
from embedsvc.engine import EngineSet
from embedsvc.errors import ClientDisconnected, UnhealthyError
from embedsvc.metrics import Metrics
from embedsvc.settings import Settings
from embedsvc.tracing import Tracer

log = logging.getLogger(__name__)

__all__ = ["ClientDisconnected", "Service", "disconnect_probe"]


def disconnect_probe(receive: Receive) -> Callable[[], bool] | None:
    """A cheap `() -> bool` that says whether the client has closed the connection.

    uvicorn's `receive` is a method of its request cycle, which keeps a `disconnected`
    flag; reading it costs nothing, so one sweep per process (engine.Frontend) can watch
    every request without a task each. None for a server without such a flag."""
    cycle: Any = getattr(receive, "__self__", None)
    if cycle is None or not isinstance(getattr(cycle, "disconnected", None), bool):
        return None
    return lambda: bool(cycle.disconnected)


class Service:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engines: EngineSet | None = None
        self.load_error: str | None = None
        self.draining = False
        # OpenAI-route token ids read as cl100k_base (--openai-token-ids cl100k).
        self.cl100k = Cl100kDecoder.load() if settings.openai_token_ids == "cl100k" else None
        # A span per request over OTLP (--otlp-endpoint or OTEL_EXPORTER_OTLP_*), else None.
        self.tracer = Tracer.from_settings(settings.otlp_endpoint, settings.otlp_service_name)

    @property
    def ready(self) -> bool:
        return not self.draining and self.engines is not None and self.engines.ready

    def engine_set(self) -> EngineSet:
        if self.engines is None:
            raise UnhealthyError(self.load_error or "models are still loading; retry shortly")
        return self.engines
