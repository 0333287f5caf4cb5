"""What the routes share: the loaded engines (once loading finished) and the embed call
that drops a request's work when its client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.types import Receive

from embedsvc.api.cl100k import Cl100kDecoder
from embedsvc.engine import EmbedRequest, EmbedResult, EngineSet, ModelEngine
from embedsvc.errors import ClientDisconnected, UnhealthyError
from embedsvc.metrics import Metrics
from embedsvc.settings import Settings

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

    @property
    def ready(self) -> bool:
        return not self.draining and self.engines is not None and self.engines.ready

    def engine_set(self) -> EngineSet:
        if self.engines is None:
            raise UnhealthyError(self.load_error or "models are still loading; retry shortly")
        return self.engines

    async def embed(self, request: Request, engine: ModelEngine, req: EmbedRequest) -> EmbedResult:
        """Run the job; if the client disconnects first, its inputs are skipped."""
        probe = request.scope.get("state", {}).get("disconnected")
        if probe is not None:
            return await engine.embed(req, probe)
        # Another server: watch the connection with a task of its own.
        job = asyncio.ensure_future(engine.embed(req))
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel()
            watcher.cancel()
            raise
        if job in done:
            watcher.cancel()
            return job.result()
        job.cancel()
        log.info("client of request %s disconnected; its inputs are dropped", req.request_id)
        raise ClientDisconnected()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
