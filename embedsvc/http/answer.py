"""What the transport and the API exchange: an answer (status, header lines, body) and the
direct route's signature. The API imports this package; this package never imports the API."""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
