"""The FastAPI application: routers, error rendering, request ids, engine lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedsvc import __version__
from embedsvc.api.bodies import documented, json_schema
from embedsvc.api.errors import dialect_of, dump_json, error_body, install_error_handlers
from embedsvc.api.middleware import RequestMiddleware
from embedsvc.api.openai import openai_router
from embedsvc.api.ops import ops_router
from embedsvc.api.routes import ROUTES, EngineRoutes
from embedsvc.api.service import Service
from embedsvc.api.tei import tei_router
from embedsvc.engine import EngineSet
from embedsvc.errors import ClientDisconnected, ErrorKind
from embedsvc.http.answer import Answer, DirectRoute
from embedsvc.memory import settle_gc
from embedsvc.metrics import Metrics
from embedsvc.settings import Settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    engines: EngineSet | None = None,
    loader: Callable[[], EngineSet | Awaitable[EngineSet]] | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> EmbedsvcApp:
    """Build the app around already loaded `engines`, or a `loader` run after start-up
    (a function, run on a thread, or a coroutine function, run on the loop).

    With a loader the port opens at once and /health answers 503 until every model is
    loaded and warmed; if loading fails, `on_load_failure(reason)` is called.
    """
    metrics = metrics or Metrics()
    service = Service(settings, metrics)
    lifespan = _lifespan(service, engines, loader, on_load_failure)

    app = FastAPI(
        title="embedsvc",
        version=__version__,
        description="Embedding inference: TEI and OpenAI dialects.",
        lifespan=lifespan,
    )
    app.state.service = service

    def on_failure(path: str, kind: ErrorKind) -> None:
        metrics.failures.labels(path, kind.value).inc()

    install_error_handlers(app, on_failure)

    async def disconnected(request: Request, exc: Exception) -> Response:
        metrics.failures.labels(request.url.path, "client_disconnected").inc()
        return Response(status_code=499)  # nobody reads it; the client has gone

    app.add_exception_handler(ClientDisconnected, disconnected)
    routes = EngineRoutes(service)
    app.state.engine_routes = routes
    for route in ROUTES.values():
        app.add_api_route(
            route.path,
            EngineRoutes.fastapi_endpoint(route.path),
            methods=["POST"],
            summary=route.summary,
            tags=[route.tag],
            name=route.name or route.call.__name__,
            response_class=Response,
            openapi_extra=documented(route.body),
        )
    app.include_router(tei_router())
    app.include_router(openai_router())
    app.include_router(ops_router())
    _document_bodies(app)
    # Outside FastAPI's own middleware stack (error pages, telemetry hooks, body limits):
    # the lean path for the embedding routes pays for none of it.
    middleware = RequestMiddleware(
        app,
        service=service,
        routes=routes,
        api_keys=settings.api_keys(),
        protect_ops=settings.auth_health_metrics,
        max_payload_bytes=settings.max_payload_bytes,
    )
    outer: ASGIApp = middleware
    origins = settings.cors_origin_list()
    if origins:  # outermost: preflights carry no API key, and every answer gets the headers
        outer = CORSMiddleware(
            outer,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=[
                "x-request-id",
                "x-total-time",
                "x-compute-tokens",
                "x-truncated-inputs",
            ],
        )
    # The embedding routes straight from embedsvc's HTTP protocol (http/protocol.py);
    # with CORS on, every answer needs the CORS middleware's headers: no direct route.
    return EmbedsvcApp(app, outer, None if origins else middleware.direct, metrics)


def _lifespan(
    service: Service,
    engines: EngineSet | None,
    loader: Callable[[], EngineSet | Awaitable[EngineSet]] | None,
    on_load_failure: Callable[[str], None] | None,
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: start the loaded `engines`, or run `loader` after start-up
    (the port opens at once; /health answers 503 until every model is loaded and warmed)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        load_task: asyncio.Task[Any] | None = None
        if engines is not None:
            engines.start(loop)
            service.engines = engines
        elif loader is not None:

            async def load() -> None:
                try:
                    if inspect.iscoroutinefunction(loader):
                        loaded = await loader()
                    else:
                        loaded = await asyncio.to_thread(loader)
                except Exception as e:
                    service.load_error = f"model loading failed: {e}"
                    log.error("%s", service.load_error)
                    if on_load_failure:
                        on_load_failure(service.load_error)
                    return
                loaded.start(loop)
                service.engines = loaded
                settle_gc()
                log.info("ready: %s", ", ".join(e.name for e in loaded))

            load_task = asyncio.create_task(load())
        try:
            yield
        finally:
            if load_task is not None:
                load_task.cancel()
            if service.engines is not None and engines is None:
                service.engines.stop()
            if service.tracer is not None:
                service.tracer.shutdown()  # the spans not yet exported go now

    return lifespan


def _document_bodies(app: FastAPI) -> None:
    """/openapi.json with the request bodies' schemas (api/bodies.py) among its components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(json_schema()[1])
        return app.openapi_schema or schema

    app.openapi = openapi  # type: ignore[method-assign]


class EmbedsvcApp:
    """The ASGI app that uvicorn runs: request plumbing (and CORS) around the FastAPI app,
    and `direct`, the embedding routes for embedsvc's HTTP protocol (or None)."""

    def __init__(
        self, fastapi_app: FastAPI, asgi: ASGIApp, direct: DirectRoute | None, metrics: Metrics
    ) -> None:
        self.fastapi = fastapi_app
        self.state = fastapi_app.state
        self._asgi = asgi
        self.direct = direct
        self._closed = metrics.connections_closed

    def on_connection_closed(self, reason: str) -> None:
        """The HTTP protocol refused or closed a connection by one of its bounds."""
        self._closed.labels(reason).inc()

    def error_answer(self, path: str, kind: ErrorKind, message: str) -> Answer:
        """An error in the dialect of `path`, for the HTTP protocol to write when it refuses
        a connection or a request head before the app sees it."""
        status, body = error_body(dialect_of(path), kind, message)
        out = dump_json(body)
        return status, b"content-type: application/json\r\ncontent-length: %d\r\n" % len(out), out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)
