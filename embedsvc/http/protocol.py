"""embedsvc's HTTP protocol: uvicorn's httptools protocol with one write per response
(one_write.py), the embedding routes answered without an ASGI task, and the bounds on what
a connection holds (ConnectionLimits: head size, header count, head and body time, the
connection cap, write backpressure; what unread answers hold is stalled.py's layer below).
One class over about 400 lines, kept whole: its methods are uvicorn's callbacks, overridden
together around one parser and one set of timers, and read best side by side.

Direct route (EmbedsvcHttpProtocol): uvicorn runs every request as a task that calls the
ASGI app with receive/send coroutines and message dicts; for single short queries that
plumbing was about a quarter of the event loop's time (py-spy). A POST whose
body is at most 64 KiB (by content-length; uvicorn stops reading past that until the app
asks for more) is held until the body is complete and offered to the app's `direct`
callable (api/middleware.py). Such a request is tracked by a DirectCycle, not uvicorn's
RequestResponseCycle with its ASGI scope and asyncio.Event (those took 1.7 of the 5.8 µs
the protocol spent on a request answered at once). The route either declines, and
uvicorn's cycle is made then and the request runs as a task as always (the body is still
there for the app to read), or it answers through a callback, and the protocol writes the
response in one write (after any head still held for the end of the turn, so pipelined
answers keep their order) and goes on with the connection as uvicorn does after a response
(keep-alive, pipelined requests, close). Requests with
`Expect: 100-continue` and larger or chunked bodies take the ASGI path.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http import flow_control, httptools_impl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from embedsvc.http.answer import Answer, DirectRoute, header_lines
from embedsvc.http.direct_cycle import DirectCycle, content_length, logged_path
from embedsvc.http.stalled import StalledWrites

# What uvicorn buffers of a body before the app reads; its status lines, ready to write.
HIGH_WATER_LIMIT: int = getattr(flow_control, "HIGH_WATER_LIMIT", 1 << 16)
STATUS_LINE: dict[int, bytes] = getattr(httptools_impl, "STATUS_LINE", {})


# GET paths answered even on a connection past the cap (then closed): a prober's view of a
# server under a flood of connections is its own health, not the flood's 503.
_PROBES = frozenset((b"/health", b"/metrics", b"/info"))
# Bytes of a request line besides the target ("POST " and " HTTP/1.1\r\n"), and of a
# header line besides its name and value (": " and "\r\n"): the head is counted as sent.
_LINE_BYTES = 16
_HEADER_LINE_BYTES = 4


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the refusal is then written."""


class EmbedsvcHttpProtocol(StalledWrites):
    """OneWriteHttpProtocol with the app's direct route (see the module), and the bounds
    of ConnectionLimits on what a connection holds before its request reaches the app: the
    size of a request head, the time it takes to arrive, the number of connections; and
    write backpressure: while the client does not read, no further request of its
    connection is read or answered."""

    direct_route = True  # False: every request through uvicorn's ASGI cycle, bounds kept

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct: DirectRoute | None = (
            getattr(self.config.app, "direct", None) if self.direct_route else None
        )
        # (path, kind, message) -> Answer in the path's dialect (api/app.py)
        self._error_answer: Callable[[str, Any, str], Answer] | None = getattr(
            self.config.app, "error_answer", None
        )
        self._refusal: Answer | None = None
        self._over_cap = False
        self._head_since: float | None = None  # loop time a request head began, if one has
        self._head_bytes = 0
        self._header_count = 0
        self._body_since: float | None = None  # loop time a head ended whose body is due
        self._timer: asyncio.TimerHandle | None = None  # the head and body deadlines
        self._write_blocked = False  # a response finished while the client was not reading
        self._deferred: DirectCycle | None = None
        self._completing = False  # in on_response_complete
        self._completed_again = False
        # server_state.default_headers (date, server), as lines; the server replaces the
        # list when the date changes.
        self._defaults: tuple[object, bytes] = (None, b"")
        self._idle_since: float | None = None  # loop time of the last response, if idle

    # ---- bounds on a connection before its request reaches the app ----

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        self._head_since = self.loop.time()  # a new connection owes its first head
        self._timer = self.loop.call_later(limits.header_timeout, self._deadline_due)
        if limits.max_connections and len(self.connections) > limits.max_connections:
            self._over_cap = True  # its first request is answered 503, then it closes

    def _deadline_due(self) -> None:
        """Close a connection whose request head has taken longer than header_timeout, or
        whose body has taken longer than body_timeout after its head: 408 in the path's
        dialect (a connection that never sent a byte just closes). While the server itself
        does not read (a pipelined request waits its turn), the body's clock restarts."""
        self._timer = None
        if self.transport.is_closing():
            return
        limits = self.limits
        now = self.loop.time()
        head, body = self._head_since, self._body_since
        if head is not None and now - head >= limits.header_timeout:
            if self._head_bytes == 0 and not getattr(self, "url", b""):
                self.transport.close()
                return
            self._closed_for("header_timeout")
            self._refusal = self._error(
                "REQUEST_TIMEOUT",
                f"the request head (request line and headers) did not arrive within "
                f"{limits.header_timeout:g} seconds",
            )
            self._write_refusal()
            return
        if body is not None and self.flow.read_paused:
            body = self._body_since = now
        if body is not None and now - body >= limits.body_timeout:
            self._refuse_body()
            return
        due = now + max(limits.header_timeout, limits.body_timeout)
        if head is not None:
            due = min(due, head + limits.header_timeout)
        if body is not None:
            due = min(due, body + limits.body_timeout)
        self._timer = self.loop.call_at(due, self._deadline_due)

    def _refuse_body(self) -> None:
        """408 for a body that stopped arriving; the request's cycle, if the app has it
        already, sees a disconnect and answers nothing."""
        self._closed_for("body_timeout")
        cycle = self.cycle
        if cycle is not None:
            if cycle.response_started:  # the app answers as it reads: nothing to say now
                self.transport.close()
                return
            cycle.disconnected = True
            cycle.message_event.set()
        self._refusal = self._error(
            "REQUEST_TIMEOUT",
            f"the request body did not arrive within {self.limits.body_timeout:g} seconds "
            "of its head",
        )
        self._write_refusal()

    # on_url and on_header are uvicorn's (checked at start) with the count added, written
    # out rather than calling uvicorn's: they run for every header of every request.
    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head()
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + _HEADER_LINE_BYTES
        self._header_count += 1
        if self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head()
        if self._header_count > self.limits.max_headers:
            self._refuse_head(f"the request has more than {self.limits.max_headers} header lines")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _refuse_head(self, message: str = "") -> None:
        self._closed_for("headers_too_large")
        self._refusal = self._error(
            "HEADERS_TOO_LARGE",
            message or f"the request line and headers exceed {self.limits.max_header_bytes} bytes",
        )
        raise _Refused

    def _error(self, kind: str, message: str) -> Answer:
        """The error `kind` (an ErrorKind name) in the dialect of the request's path."""
        try:
            path = httptools.parse_url(getattr(self, "url", b"") or b"/").path.decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            path = "/"
        if self._error_answer is not None:
            from embedsvc.errors import ErrorKind

            return self._error_answer(path, ErrorKind[kind], message)
        body = message.encode()
        status = {"REQUEST_TIMEOUT": 408, "HEADERS_TOO_LARGE": 431}.get(kind, 503)
        return status, b"content-length: %d\r\n" % len(body), body

    def _write_refusal(self) -> None:
        assert self._refusal is not None
        status, lines, body = self._refusal
        head = (STATUS_LINE[status], lines, b"connection: close\r\n\r\n", body)
        self.joining.write_response(b"".join(head))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but a head refused by the bounds is answered with its own status
        (uvicorn answers any parser error 400 and logs it as invalid HTTP)."""
        if self._refusal is not None:
            return  # answered and closing: the rest is dropped
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._write_refusal()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    # ---- requests ----

    def on_message_begin(self) -> None:
        self._head_since = self.loop.time()
        self._head_bytes = _LINE_BYTES
        self._header_count = 0
        if self._direct is None:
            super().on_message_begin()
            return
        self.url = b""
        self.expect_100_continue = False
        self.headers = []  # the ASGI scope waits for on_headers_complete, if needed at all

    def on_headers_complete(self) -> None:
        """A POST with a content-length within what uvicorn buffers without the app
        reading gets a DirectCycle; anything else uvicorn's cycle, as uvicorn makes it."""
        self._head_since = None
        now = self._body_since = self.loop.time()  # on_message_complete ends it
        timer = self._timer  # armed at most max(header, body timeout) ahead: only a
        due = now + self.limits.body_timeout  # shorter body timeout needs it sooner
        if timer is not None and due < timer.when():
            timer.cancel()
            self._timer = self.loop.call_at(due, self._deadline_due)
        if self._over_cap and not self._probe():
            self._closed_for("too_many_connections")
            self._refusal = self._error(
                "TOO_MANY_CONNECTIONS",
                f"the server holds its most open connections ({self.limits.max_connections}"
                f" per process); retry, reusing a connection, or on another replica",
            )
            raise _Refused
        if self._direct is None or self._over_cap:
            self._uvicorn_headers_complete()
            return
        parser = self.parser
        if (
            parser.get_method() != b"POST"
            or self.expect_100_continue
            or self.limit_concurrency is not None
            or parser.should_upgrade()
            or not 0 <= content_length(self.headers) <= HIGH_WATER_LIMIT
        ):
            self._uvicorn_headers_complete()
            return
        url = httptools.parse_url(self.url)
        if b"%" in url.path or not url.path.isascii() or self.root_path:
            self._uvicorn_headers_complete()
            return
        version = parser.get_http_version()
        cycle = DirectCycle(
            url.path,
            url.query or b"",
            version,
            self.headers,
            version != "1.0" and parser.should_keep_alive(),
        )
        existing, self.cycle = self.cycle, cycle  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._deferred = cycle  # the body follows: on_message_complete
        else:  # pipelined behind a request still being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))  # type: ignore[arg-type]

    def _probe(self) -> bool:
        """Whether the request is a GET of a health or metrics path (see _PROBES)."""
        if self.parser.get_method() != b"GET":
            return False
        try:
            return httptools.parse_url(self.url).path in _PROBES
        except httptools.HttpParserInvalidURLError:
            return False

    def _uvicorn_headers_complete(self) -> None:
        """uvicorn's on_headers_complete, after the scope its on_message_begin makes (when
        embedsvc's on_message_begin left it out)."""
        if self._direct is not None:
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()
            self.url, self.headers, self.expect_100_continue = url, headers, expect
            self.scope["headers"] = headers
        super().on_headers_complete()
        if self._over_cap and self.cycle is not None:  # a probe past the cap: then close
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._body_since = None
        super().on_message_complete()
        cycle = self._deferred
        # self.cycle holds a DirectCycle or uvicorn's (typed as uvicorn's by uvicorn)
        if cycle is not None and cycle is self.cycle:  # type: ignore[comparison-overlap]
            self._deferred = None
            if not cycle.response_complete:
                self._start_direct(cycle)

    def _start_asgi_task(self, cycle: RequestResponseCycle | DirectCycle, app: Any) -> None:
        if type(cycle) is not DirectCycle:
            super()._start_asgi_task(cycle, app)  # type: ignore[arg-type]
        elif cycle.more_body:  # its turn came from the pipeline before all its body did
            self._deferred = cycle  # on_message_complete
        else:
            self._start_direct(cycle)

    def _start_direct(self, cycle: DirectCycle) -> None:
        if not self._run_direct(cycle):
            super()._start_asgi_task(self._asgi_cycle(cycle), self.app)

    def _asgi_cycle(self, d: DirectCycle) -> RequestResponseCycle:
        """uvicorn's cycle for a request the direct route declined, its body complete."""
        saved = self.url, self.headers, self.expect_100_continue, self.scope
        super().on_message_begin()  # the scope as uvicorn makes it
        scope = self.scope
        self.url, self.headers, self.expect_100_continue, self.scope = saved
        scope["headers"] = d.headers
        scope["method"] = "POST"
        if d.http_version != "1.1":
            scope["http_version"] = d.http_version
        scope["path"] = d.path
        scope["raw_path"] = d.raw_path
        scope["query_string"] = d.query
        cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=d.keep_alive,
            on_response=self.on_response_complete,
        )
        cycle.body, cycle.more_body, cycle.disconnected = d.body, False, d.disconnected
        cycle.message_event.set()
        if self.cycle is d:  # type: ignore[comparison-overlap]
            self.cycle = cycle  # it held the DirectCycle till now
        return cycle

    def on_response_complete(self) -> None:
        """uvicorn's, without recursion: it starts the next pipelined request, which the
        direct route may answer at once (an error), completing again from within. Each
        completion still runs uvicorn's handler once, one after the other."""
        if self._completing:
            self._completed_again = True
            return
        self._completing = True
        try:
            while True:
                self._completed_again = False
                self._response_complete()
                if not self._completed_again:
                    return
        finally:
            self._completing = False

    def _response_complete(self) -> None:
        """uvicorn's on_response_complete, with one keep-alive timer per connection:
        uvicorn arms a timer after each response and cancels it when the next request
        arrives, a timer made and cancelled per request. Here a request only marks the
        connection busy, a response notes when it went idle, and the timer, when due,
        closes the connection if it has been idle for the whole timeout, else waits for
        what is left of it."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.flow.write_paused:  # the client is not reading what it asked for: wait
            self.flow.pause_reading()
            self._write_blocked = True
            return
        self._next_request()

    def resume_writing(self) -> None:
        self._unstall()
        super().resume_writing()
        if self._write_blocked:
            self._write_blocked = False
            if not self.transport.is_closing():
                self._next_request()

    def _next_request(self) -> None:
        """Read on, start a pipelined request or wait for the next one."""
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _unset_keepalive_if_required(self) -> None:
        """Bytes arrived (or the connection is going): busy, not idle."""
        self._idle_since = None

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        idle = self._idle_since
        if idle is None or self.transport.is_closing():
            return  # busy: the next response arms the timer again
        left = idle + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unstall()
        super().connection_lost(exc)

    def _run_direct(self, cycle: DirectCycle) -> bool:
        assert self._direct is not None
        return self._direct(
            cycle.path,
            cycle.headers,
            bytes(cycle.body),
            lambda: cycle.disconnected,
            functools.partial(self._respond, cycle),
        )

    def _respond(self, cycle: DirectCycle, answer: Answer) -> None:
        """Write `answer` and finish the request as uvicorn's cycle does."""
        if cycle.disconnected or cycle.response_complete:
            return
        status, lines, body = answer
        if self.access_log:  # as uvicorn logs it (the peer's address: no proxy headers)
            self.access_logger.info(
                '%s - "POST %s HTTP/%s" %d',
                f"{self.client[0]}:{self.client[1]}" if self.client else "",
                logged_path(cycle.raw_path, cycle.query),
                cycle.http_version,
                status,
            )
        defaults = self.server_state.default_headers
        if self._defaults[0] is not defaults:
            self._defaults = (defaults, header_lines(defaults))
        close = b"" if cycle.keep_alive else b"connection: close\r\n"
        head = (STATUS_LINE[status], self._defaults[1], lines, close, b"\r\n", body)
        self.joining.write_response(b"".join(head))
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()
