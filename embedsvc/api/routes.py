"""Every engine route (POST /embed, /, /embed_sparse, /similarity, /v1/embeddings,
/embeddings, /rerank, /v1/rerank, /v2/embed, ...) answered one way, whoever takes the request in:

- the HTTP protocol's direct route (http/protocol.py -> middleware.direct -> `begin`),
  which answers from a callback without a task or ASGI messages;
- the request middleware's ASGI path (`handle`), for requests the direct route declines
  (with CORS on, with --no-http-direct, bodies that arrive slowly);
- the FastAPI app (`fastapi_endpoint`), which serves the same routes and documents them
  in /openapi.json.

Each is: decode the body (api/bodies.py), build the call (the dialect module's Route),
run it through the engine, render the 200 or the error in the route's dialect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from embedsvc.api.bodies import decode
from embedsvc.api.calls import Call, Context, Route
from embedsvc.api.classify import ROUTES as CLASSIFY_ROUTES
from embedsvc.api.cohere import ROUTES as COHERE_ROUTES
from embedsvc.api.encode import timing_lines
from embedsvc.api.errors import embedsvc_error_response, internal_error_response
from embedsvc.api.openai import ROUTES as OPENAI_ROUTES
from embedsvc.api.rerank import ROUTES as RERANK_ROUTES
from embedsvc.api.service import Service
from embedsvc.api.tei import ROUTES as TEI_ROUTES
from embedsvc.engine import EmbedResult
from embedsvc.errors import ClientDisconnected, EmbedsvcError, ErrorKind
from embedsvc.http.answer import Answer, header_lines, header_pairs
from embedsvc.logs import request_id_var

log = logging.getLogger(__name__)

ROUTES: dict[str, Route] = {
    r.path: r
    for r in (*TEI_ROUTES, *OPENAI_ROUTES, *RERANK_ROUTES, *COHERE_ROUTES, *CLASSIFY_ROUTES)
}

_JSON = b"content-type: application/json\r\n"


class EngineRoutes:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.metrics = service.metrics
        self.tracer = service.tracer  # None unless tracing is on

    def prepare(
        self, path: str, body: bytes, rid: str, timeout: float | None, trace: str = ""
    ) -> Call:
        """The call a body asks for; raises EmbedsvcError for one to refuse."""
        route = ROUTES[path]
        call = route.call(self.service, decode(route.body, body), Context(path, rid, timeout))
        call.metric = route.label
        call.trace = trace
        return call

    def answer(self, call: Call, result: EmbedResult) -> Answer:
        """The 200 for a finished call."""
        started = time.perf_counter() if self.tracer is not None else 0.0
        out = call.render(result)
        requests, response_bytes = call.engine.metrics.route(call.metric)
        requests.inc()
        response_bytes.inc(len(out))
        if self.tracer is not None:
            self._trace(call, result, started, len(out))
        return 200, _JSON + b"content-length: %d\r\n" % len(out) + timing_lines(result), out

    def _trace(self, call: Call, result: EmbedResult, started: float, size: int) -> None:
        assert self.tracer is not None
        req = call.req
        attributes = {
            "embedsvc.model": call.engine.name,
            "embedsvc.inputs": req.size,
            "embedsvc.tokens": result.prompt_tokens,
            "embedsvc.truncated_inputs": req.truncated,
            "embedsvc.request_id": req.request_id,
            "http.response.body.size": size,
        }
        phases = (
            result.tokenization_time,
            result.queue_time,
            result.inference_time,
            result.total_time,
        )
        self.tracer.request(call.metric, call.trace, phases, started, attributes)

    def failure(self, path: str, exc: BaseException, rid: str) -> Answer:
        """The error answer for `exc` (a typed error, or a fault: 500, logged), counted."""
        if isinstance(exc, EmbedsvcError):
            self.metrics.failures.labels(path, exc.kind.value).inc()
            resp = embedsvc_error_response(path, exc, rid)
        elif isinstance(exc, ClientDisconnected):
            self.metrics.failures.labels(path, "client_disconnected").inc()
            return 499, b"content-length: 0\r\n", b""  # nobody reads it
        else:
            self.metrics.failures.labels(path, ErrorKind.BACKEND.value).inc()
            resp = internal_error_response(path, exc, rid)
        return resp.status_code, header_lines(resp.raw_headers), bytes(resp.body)

    async def run(
        self,
        path: str,
        body: bytes,
        rid: str,
        disconnected: Callable[[], bool] | None,
        timeout: float | None = None,
        trace: str = "",
    ) -> Answer:
        """The answer to a request, as a coroutine."""
        try:
            call = self.prepare(path, body, rid, timeout, trace)
            return self.answer(call, await call.engine.embed(call.req, disconnected))
        except Exception as e:
            return self.failure(path, e, rid)

    async def handle(
        self,
        path: str,
        body: bytes,
        send: Send,
        rid: str,
        disconnected: Callable[[], bool] | None,
        timeout: float | None = None,
        trace: str = "",
    ) -> None:
        """`run`, answered with ASGI messages."""
        status, lines, out = await self.run(path, body, rid, disconnected, timeout, trace)
        headers = header_pairs(lines)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    def begin(
        self,
        path: str,
        body: bytes,
        rid: str,
        timeout: float | None,
        disconnected: Callable[[], bool],
        respond: Callable[[Answer], None],
        trace: str = "",
    ) -> None:
        """`run` without a coroutine, for the HTTP protocol's direct route:
        `respond(answer)` is called once, now or when the vectors are ready (on the
        event loop)."""
        try:
            call = self.prepare(path, body, rid, timeout, trace)
        except Exception as e:
            respond(self.failure(path, e, rid))
            return

        def done(result: EmbedResult | None, error: BaseException | None) -> None:
            try:
                if result is None:
                    raise error or RuntimeError("no result")
                answer = self.answer(call, result)
            except BaseException as e:  # the answer to any failure, a fault too (500)
                token = request_id_var.set(rid)  # for the log record of a fault
                try:
                    answer = self.failure(path, e, rid)
                finally:
                    request_id_var.reset(token)
            respond(answer)

        try:
            call.engine.submit(call.req, disconnected, done)
        except Exception as e:
            respond(self.failure(path, e, rid))

    @staticmethod
    def fastapi_endpoint(path: str) -> Callable[[Request], Awaitable[Response]]:
        """The route as a FastAPI endpoint (the app without the request middleware).

        It finds the app's EngineRoutes in app.state rather than holding them: FastAPI
        keeps every endpoint it has classified in a process-wide cache, so an endpoint
        that held them would keep a dropped app's models alive for the process's life."""

        async def endpoint(request: Request) -> Response:
            routes: EngineRoutes = request.app.state.engine_routes
            state = request.scope.get("state", {})
            status, lines, out = await routes.run(
                path,
                await request.body(),
                str(state.get("request_id", "")),
                state.get("disconnected"),
                state.get("request_timeout"),
                str(state.get("traceparent", "")),
            )
            response = Response(out, status_code=status)
            response.raw_headers = header_pairs(lines)
            return response

        return endpoint
