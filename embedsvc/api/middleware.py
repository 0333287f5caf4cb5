"""Per-request plumbing in one pure-ASGI hop, before any routing or parsing.

- Request id: `x-request-id` from the request (or a new one: this process's random
  prefix and a counter), echoed on the response and attached to log records.
- Draining: after SIGTERM every route but /health and /metrics answers 503.
- API keys: `Authorization: Bearer KEY`, compared in constant time against every key.
- Deadlines: `x-request-timeout: SECONDS` shortens the time the request may wait for its
  vectors (never past --max-queue-time); see engine/admission.py.
- Body size: bodies larger than max_payload_bytes get 413 before they are parsed. A body
  refused (401, 413, 503) is read and dropped first, within bounds, so the client that
  is still sending it reads the answer instead of a broken pipe.
- Content type: POST bodies are read as JSON whatever the content type says (`curl -d`
  sends a form type by default); a body that is not JSON still gets a 422 that says so.
- The engine routes (routes.py) are answered here, without FastAPI's routing; every
  other request goes on to the FastAPI app.
- `direct`: the same for embedsvc's HTTP protocol (http/protocol.py), which offers it
  each small POST before it would run the app; it answers the engine routes through a
  callback (no task, no ASGI messages) and declines the rest.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedsvc.api.errors import error_response, internal_error_response
from embedsvc.api.routes import ROUTES, EngineRoutes
from embedsvc.api.service import disconnect_probe
from embedsvc.errors import ErrorKind
from embedsvc.http.answer import Answer
from embedsvc.logs import request_id_var

OPS_PATHS = frozenset({"/health", "/metrics"})
# A refused request's body is read and dropped up to this many bytes and seconds.
DISCARD_BYTES = 64 * 1024 * 1024
DISCARD_SECONDS = 5.0


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        service: Any,
        routes: EngineRoutes,
        api_keys: list[str],
        protect_ops: bool,
        max_payload_bytes: int,
    ) -> None:
        self.app = app
        self.service = service
        self.keys = [k.encode() for k in api_keys]
        self.protect_ops = protect_ops
        self.max_payload = max_payload_bytes
        self.routes = routes
        # Request ids: unique per process (random prefix) and cheap (a counter).
        self._rid_prefix = os.urandom(8).hex()
        self._rid_counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every request the direct route does not take, in order: draining, API key,
        x-request-timeout, the bounded body, then the engine route or the FastAPI app.
        One function of about 110 lines (a reason, against the 80-line rule): its
        closures share the request's state (whether the answer has started, whether the
        body was read, which decides how a refusal closes), and it is a hot path."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid, auth, timeout_header, length, headers, trace = _scan(scope.get("headers", ()))
        rid = rid or f"{self._rid_prefix}{next(self._rid_counter):016x}"  # 32 hex digits
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["traceparent"] = trace
        probe = state["disconnected"] = disconnect_probe(receive)
        request_id_var.set(rid)
        id_header = (b"x-request-id", rid.encode("latin-1"))
        path: str = scope["path"]

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        async def call_app(receive: Receive) -> None:
            """The FastAPI app. Its error middleware answers an unexpected exception with
            a 500 (request id in header and body, traceback logged once by the handler),
            then raises it again for the server to log: that second traceback stops here."""
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as e:
                if not started:
                    resp = internal_error_response(path, e, rid)
                    await resp(scope, receive, send_with_id)

        body_read = scope.get("method") not in ("POST", "PUT", "PATCH")

        async def refuse(kind: ErrorKind, message: str) -> None:
            """Answer before the app runs. A client still writing its body reads no answer
            if the socket closes under it (a broken pipe instead of the 401 or 413), so
            the rest of the body is read and dropped first, within bounds, as nginx's
            lingering close does; past them the connection closes after the answer."""
            headers = None
            if not body_read and (
                _expects_continue(scope) or not await self._discard_body(receive)
            ):
                # A client waiting for "100 Continue" gets the refusal instead (reading
                # the body would have told it to send the body first).
                headers = {"connection": "close"}
            resp = error_response(path, kind, message, headers=headers)
            await resp(scope, receive, send_with_id)

        if self.service.draining and path not in OPS_PATHS:
            await refuse(
                ErrorKind.UNHEALTHY, "the server is shutting down; retry on another replica"
            )
            return
        # The API docs (/docs, /redoc, /openapi.json) follow the key like every route.
        needs_key = self.keys and (path not in OPS_PATHS or self.protect_ops)
        if needs_key and not self._authorized(auth):
            what = "missing" if not auth else "invalid"
            await refuse(
                ErrorKind.UNAUTHORIZED,
                f"API key {what}: send the header 'Authorization: Bearer <key>'",
            )
            return
        timeout = None
        if timeout_header:
            timeout = _seconds(timeout_header)
            if timeout is None:
                await refuse(
                    ErrorKind.VALIDATION,
                    f"x-request-timeout must be a positive number of seconds, got "
                    f"{timeout_header.decode('latin-1')[:40]!r}",
                )
                return
            state["request_timeout"] = timeout
        if scope.get("method") != "POST":
            await call_app(receive)
            return
        if length is not None and length > self.max_payload:
            await refuse(ErrorKind.PAYLOAD_TOO_LARGE, self._too_large(length))
            return
        # Read the whole body here (bounded), then replay it to the app.
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_payload:
                await refuse(ErrorKind.PAYLOAD_TOO_LARGE, self._too_large(None))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_read = True
        body = b"".join(chunks)
        if path in ROUTES:
            await self.routes.handle(path, body, send_with_id, rid, probe, timeout, trace)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers.append((b"content-type", b"application/json"))
        scope["headers"] = headers
        await call_app(replay)

    def direct(
        self,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        disconnected: Callable[[], bool],
        respond: Callable[[Answer], None],
    ) -> bool:
        """The engine routes straight from the HTTP protocol (http/protocol.py), for a
        POST whose whole body has arrived: what `__call__` does for it, without the ASGI
        messages and the task. False (nothing done) for anything `__call__` would answer
        otherwise: a route that is not an engine route, draining, a missing or wrong API
        key, a bad x-request-timeout, a body too large; the protocol then runs the app.
        Else `respond(answer)` is called once, now or later on the loop, with the
        x-request-id header among the answer's."""
        if path not in ROUTES or self.service.draining:
            return False
        rid, auth, timeout_header, _, _, trace = _scan(headers, keep=False)
        if self.keys and not self._authorized(auth):
            return False
        timeout = None
        if timeout_header:
            timeout = _seconds(timeout_header)
            if timeout is None:
                return False
        if len(body) > self.max_payload:
            return False
        rid = rid or f"{self._rid_prefix}{next(self._rid_counter):016x}"
        id_line = b"x-request-id: %s\r\n" % rid.encode("latin-1")

        def with_id(answer: Answer) -> None:
            status, lines, body = answer
            respond((status, lines + id_line, body))

        # The request id for log records while it is taken in (the protocol's callbacks
        # share one context: set, then put back).
        token = request_id_var.set(rid)
        try:
            self.routes.begin(path, body, rid, timeout, disconnected, with_id, trace)
            return True
        finally:
            request_id_var.reset(token)

    async def _discard_body(self, receive: Receive) -> bool:
        """Read and drop the request body: True once it is all read, False past
        DISCARD_BYTES or DISCARD_SECONDS (or if the client hung up)."""
        dropped = 0
        deadline = asyncio.get_running_loop().time() + DISCARD_SECONDS
        while dropped <= DISCARD_BYTES:
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except TimeoutError:
                return False
            if message["type"] == "http.disconnect":
                return False
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        ok = False
        for key in self.keys:  # no early exit: same work whichever key matches
            ok |= hmac.compare_digest(token, key)
        return ok and scheme.lower() == b"bearer"

    def _too_large(self, length: int | None) -> str:
        got = f"{length} bytes" if length is not None else "the body"
        return (
            f"request body too large: {got} exceeds max_payload_bytes ({self.max_payload}); "
            "send fewer or shorter inputs per request"
        )


def _scan(
    raw: Iterable[tuple[bytes, bytes]], keep: bool = True
) -> tuple[str, bytes, bytes, int | None, list[tuple[bytes, bytes]], str]:
    """Request id, authorization, x-request-timeout and content-length from the headers,
    (`keep`) the headers without content-type, and the W3C traceparent."""
    rid = ""
    auth = b""
    timeout_header = b""
    trace = ""
    length: int | None = None
    headers = []
    for name, value in raw:
        if name == b"x-request-id":
            rid = value.decode("latin-1")[:128]
        elif name == b"traceparent":
            trace = value.decode("latin-1")[:128]
        elif name == b"authorization":
            auth = value
        elif name == b"x-request-timeout":
            timeout_header = value
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"content-type":
            continue
        if keep:
            headers.append((name, value))
    return rid, auth, timeout_header, length, headers, trace


def _expects_continue(scope: Scope) -> bool:
    return any(
        name == b"expect" and value.lower() == b"100-continue"
        for name, value in scope.get("headers", ())
    )


def _seconds(value: bytes) -> float | None:
    """A positive, finite number of seconds from a header, or None."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds < float("inf") else None
