"""uvicorn's httptools protocol, writing a response's head and body in one write.

uvicorn writes the status line and headers when the app sends `http.response.start` and
the body on `http.response.body`: two writes, and with TCP_NODELAY two TCP segments, for
every small response such as an embedding. Here the connection's transport holds a
response head back until the next write (the body, which the app sends next) and sends
both together. A head with nothing after it in the same turn of the event loop (a HEAD
request, a streamed response whose body comes later) goes out at the end of that turn;
closing the connection sends anything held first. Interim `1xx` heads are not held.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
