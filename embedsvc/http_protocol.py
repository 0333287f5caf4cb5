"""uvicorn's httptools protocol, writing a response's head and body in one write, and
answering the embedding routes without an ASGI task.

One write (OneWriteHttpProtocol):

uvicorn writes the status line and headers when the app sends `http.response.start` and
the body on `http.response.body`: two writes, and with TCP_NODELAY two TCP segments, for
every small response such as an embedding. Here the connection's transport holds a
response head back until the next write (the body, which the app sends next) and sends
both together. A head with nothing after it in the same turn of the event loop (a HEAD
request, a streamed response whose body comes later) goes out at the end of that turn;
closing the connection sends anything held first. Interim `1xx` heads are not held.

Direct route (EmbedsvcHttpProtocol): uvicorn runs every request as a task that calls the
ASGI app with receive/send coroutines and message dicts; for single short queries that
plumbing was about a quarter of the event loop's time (py-spy). A POST whose
body is at most 64 KiB (by content-length; uvicorn stops reading past that until the app
asks for more) is held until the body is complete and offered to the app's `direct`
callable (api/middleware.py): it either declines, and the request runs as a task as
always (the body is still there for the app to read), or it answers through a callback,
and the protocol writes the response in one write (after any head still held for the
end of the turn, so pipelined answers keep their order) and goes on with the connection as
uvicorn does after a response (keep-alive, pipelined requests, close). Requests with
`Expect: 100-continue` and larger or chunked bodies take the ASGI path.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

LARGE = 1 << 16


class _HeadWithBody:
    """An asyncio transport that joins a response head to the write after it."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) > LARGE:  # joining would copy the body; two writes cost less
                self._transport.write(held)
                self._transport.write(data)
            else:
                self._transport.write(held + bytes(data))
        elif data[:9] == b"HTTP/1.1 " and data[9:10] != b"1":
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def write_response(self, data: bytes) -> None:
        """A whole response (head and body): after anything held, never held itself."""
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def is_closing(self) -> bool:  # asked after every response: not through __getattr__
        return self._transport.is_closing()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose responses leave in one write each (see the module)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.joining = _HeadWithBody(transport, self.loop)
        super().connection_made(self.joining)  # type: ignore[arg-type]


# A response: status, header lines (b"name: value\r\n" each), body. Header lines, not
# pairs: a direct answer's head is joined from a few byte strings, none built per header.
Answer = tuple[int, bytes, bytes]


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)


def header_pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    """`header_lines` back as (name, value) pairs (for an ASGI response)."""
    pairs = []
    for line in lines.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            pairs.append((name, value))
    return pairs


# The app's direct route: (path, headers, body, disconnected, respond) -> taken.
DirectRoute = Callable[
    [str, list[tuple[bytes, bytes]], bytes, Callable[[], bool], Callable[[Answer], None]], bool
]


class EmbedsvcHttpProtocol(OneWriteHttpProtocol):
    """OneWriteHttpProtocol with the app's direct route (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct: DirectRoute | None = getattr(self.config.app, "direct", None)
        self._deferred: RequestResponseCycle | None = None
        self._completing = False  # in on_response_complete
        self._completed_again = False
        # server_state.default_headers (date, server), as lines; the server replaces the
        # list when the date changes.
        self._defaults: tuple[object, bytes] = (None, b"")
        self._idle_since: float | None = None  # loop time of the last response, if idle

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if self._direct is not None and app is self.app and _direct_candidate(cycle):
            if cycle.more_body:
                self._deferred = cycle  # the body is on its way: on_message_complete
                return
            if self._run_direct(cycle):  # a pipelined request, its body complete
                return
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self._deferred
        if cycle is not None and cycle is self.cycle:
            self._deferred = None
            if not cycle.response_complete and not self._run_direct(cycle):
                super()._start_asgi_task(cycle, self.app)

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
        super().connection_lost(exc)

    def _run_direct(self, cycle: RequestResponseCycle) -> bool:
        assert self._direct is not None
        scope = cycle.scope
        return self._direct(
            scope["path"],
            scope["headers"],  # type: ignore[arg-type]
            bytes(cycle.body),
            lambda: cycle.disconnected,
            functools.partial(self._respond, cycle),
        )

    def _respond(self, cycle: RequestResponseCycle, answer: Answer) -> None:
        """Write `answer` and finish the request as uvicorn's cycle does."""
        if cycle.disconnected or cycle.response_complete:
            return
        status, lines, body = answer
        if self.access_log:  # as uvicorn logs it (the peer's address: no proxy headers)
            scope = cycle.scope
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(scope),
                scope["method"],
                get_path_with_query_string(scope),
                scope["http_version"],
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


def _direct_candidate(cycle: RequestResponseCycle) -> bool:
    """A POST with a content-length within what uvicorn buffers without the app reading."""
    if cycle.scope["method"] != "POST" or cycle.waiting_for_100_continue:
        return False
    length = -1
    for name, value in cycle.scope["headers"]:
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            return False
    return 0 <= length <= HIGH_WATER_LIMIT
