"""The bounds embedsvc's HTTP protocol keeps on a connection (set from the settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may hold of the server before a request reaches the app, and
    what the answers it does not read may hold after."""

    max_header_bytes: int = 32 * 1024  # request line and headers, line endings too (431)
    max_headers: int = 100  # header lines of one request (431 beyond)
    header_timeout: float = 10.0  # seconds for a request's head to arrive (408 then)
    body_timeout: float = 10.0  # seconds for a body to arrive after its head (408 then)
    max_connections: int = 0  # open connections of this process (503 beyond); 0: any
    write_timeout: float = 30.0  # seconds a client may read none of a held answer (close)
    max_unsent_bytes: int = 256 << 20  # answers held for slow readers, all connections
