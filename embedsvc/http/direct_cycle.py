"""What the protocol's direct route tracks of a request in place of uvicorn's ASGI cycle,
and the two header readings it needs (http/protocol.py)."""

from __future__ import annotations


class _NoWaiters:
    """In place of the asyncio.Event of a request that no ASGI task ever waits on."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NO_WAITERS = _NoWaiters()


class DirectCycle:
    """A request bound for the direct route, in place of uvicorn's RequestResponseCycle
    (which builds the ASGI scope and an asyncio.Event for every request): what the
    protocol's callbacks read and write on `self.cycle`. Should the route decline it,
    `EmbedsvcHttpProtocol._asgi_cycle` makes uvicorn's cycle from it."""

    __slots__ = (
        "body",
        "disconnected",
        "headers",
        "http_version",
        "keep_alive",
        "message_event",
        "more_body",
        "path",
        "query",
        "raw_path",
        "response_complete",
        "response_started",
        "waiting_for_100_continue",
    )

    def __init__(
        self,
        raw_path: bytes,
        query: bytes,
        http_version: str,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        self.raw_path = raw_path
        self.path = raw_path.decode("ascii")
        self.query = query
        self.http_version = http_version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.disconnected = self.response_started = self.response_complete = False
        self.message_event = _NO_WAITERS
        self.waiting_for_100_continue = False


def logged_path(raw_path: bytes, query: bytes) -> str:
    """The path and query of an access-log line, as uvicorn writes them, except that a query
    with bytes outside ASCII (httptools passes them through) is logged, not an error."""
    path = raw_path.decode("latin-1")
    if query:
        path += "?" + query.decode("latin-1")
    return path.replace('"', "%22")


def content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The content-length of a request without transfer-encoding, else -1."""
    length = -1
    for name, value in headers:
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            return -1
    return length
