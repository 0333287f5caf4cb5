"""What a connection may hold of the server before (and while) its requests are answered:
write backpressure, the request-head size cap and timeout, the connection cap. Each
through a real server on loopback with raw sockets."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import orjson

from tests.support import raw_connect, raw_post, read_responses, wait_for


def refused(sock: socket.socket, status: bytes, words: str, tei: bool) -> None:
    """The connection's one answer is `status` in its route's dialect naming `words`, and
    then the server closes it."""
    [(line, headers, body)] = read_responses(sock, 1)
    assert line == b"HTTP/1.1 " + status
    assert headers[b"connection"] == b"close"
    err = orjson.loads(body)
    assert words in (err["error"] if tei else err["error"]["message"])
    assert sock.recv(10) == b""  # closed


def _answered(s: Any) -> float:
    return s.metric("embedsvc_requests_total", model="tiny-bge", route="/embed")


def _settled(s: Any, seconds: float = 1.0, deadline: float = 60.0) -> float:
    """The count of answered requests once it has not moved for `seconds`."""
    end = time.monotonic() + deadline
    last, since = _answered(s), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.1)
        now = _answered(s)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return now
    raise AssertionError("the server kept answering")


def test_a_client_that_does_not_read_is_not_answered_ahead(server_factory: Any) -> None:
    """40 pipelined requests with about 1.3 MB of JSON each, from a client that reads
    nothing: the server answers only what the socket buffers take (then stops reading the
    connection), not all 40 into memory; once the client reads, every answer arrives in
    order and the server serves on."""
    n = 40
    body = orjson.dumps({"inputs": ["a"] * 2048})
    with server_factory(["tiny-bge"], max_client_batch_size=2048) as s:
        host, port = s.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.connect((host, int(port)))
        sock.settimeout(60)
        before = _answered(s)
        sock.sendall(raw_post(b"/embed", body) * n)
        stalled = _settled(s) - before
        assert 1 <= stalled <= 8, f"{stalled} of {n} answers made for a client that reads none"
        answers = read_responses(sock, n)
        assert [line for line, _, _ in answers] == [b"HTTP/1.1 200 OK"] * n
        first = orjson.loads(answers[0][2])
        assert len(first) == 2048 and all(orjson.loads(a[2]) == first for a in answers[-2:])
        sock.close()
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert c.post("/embed", json={"inputs": "next"}).status_code == 200


def test_an_oversized_head_gets_431_in_the_routes_dialect(server_factory: Any) -> None:
    with server_factory(["tiny-bge"], max_header_bytes=4096) as s:
        for path, tei in ((b"/embed", True), (b"/v1/embeddings", False)):
            with raw_connect(s) as sock:
                sock.sendall(raw_post(path, b'{"inputs": "a"}', b"x-big: " + b"b" * 5000 + b"\r\n"))
                refused(sock, b"431 Request Header Fields Too Large", "exceed 4096 bytes", tei)
        with raw_connect(s) as sock:  # headers that never end are cut off at the cap
            sock.sendall(b"POST /embed HTTP/1.1\r\n")
            for _ in range(100):
                try:
                    sock.sendall(b"x-more: " + b"c" * 100 + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
            [(line, _, _)] = read_responses(sock, 1)
            assert line.startswith(b"HTTP/1.1 431 ")
        with httpx.Client(base_url=s.url, timeout=30) as c:
            ok = c.post("/embed", json={"inputs": "a"}, headers={"x-fine": "b" * 3000})
            assert ok.status_code == 200


def test_a_slow_or_missing_head_is_cut_off_after_the_header_timeout(server_factory: Any) -> None:
    with server_factory(["tiny-bge"], header_timeout=0.5) as s:
        with raw_connect(s) as sock:  # part of a head, then nothing
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\n")
            started = time.monotonic()
            [(line, _, body)] = read_responses(sock, 1)
            assert line == b"HTTP/1.1 408 Request Timeout"
            assert orjson.loads(body)["error"]["code"] == "request_timeout"
            assert 0.3 < time.monotonic() - started < 5
        with raw_connect(s) as sock:  # nothing at all: closed without an answer
            assert sock.recv(10) == b""
        with raw_connect(s) as sock:  # a kept-alive connection idle between requests is not cut
            for _ in range(2):
                sock.sendall(raw_post(b"/embed", b'{"inputs": "a"}'))
                [(line, _, _)] = read_responses(sock, 1)
                assert line == b"HTTP/1.1 200 OK"
                time.sleep(0.7)
            sock.sendall(raw_post(b"/embed", b'{"inputs": "a"}'))
            assert read_responses(sock, 1)[0][0] == b"HTTP/1.1 200 OK"


def test_connections_past_the_cap_get_503_and_close(server_factory: Any) -> None:
    with server_factory(["tiny-bge"], max_connections=2) as s:
        held = [raw_connect(s) for _ in range(2)]
        for sock in held:  # both served
            sock.sendall(raw_post(b"/embed", b'{"inputs": "a"}'))
            assert read_responses(sock, 1)[0][0] == b"HTTP/1.1 200 OK"
        with raw_connect(s) as extra:
            extra.sendall(raw_post(b"/embed", b'{"inputs": "a"}'))
            [(line, headers, body)] = read_responses(extra, 1)
            assert line == b"HTTP/1.1 503 Service Unavailable"
            assert headers[b"connection"] == b"close"
            assert orjson.loads(body)["error_type"] == "Overloaded"
            assert "most open connections (2 per process)" in orjson.loads(body)["error"]
        held.pop().close()
        connections = s.uvicorn.server_state.connections
        wait_for(lambda: len(connections) < 2, what="the server seeing the close")
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert c.post("/embed", json={"inputs": "a"}).status_code == 200
        for sock in held:
            sock.close()


def _closed(s: Any, reason: str) -> float:
    return s.metric("embedsvc_connections_closed_total", reason=reason)


def _stalled_body(s: Any, path: bytes, length: int) -> socket.socket:
    """A connection that sends a complete head and one byte of its body, then nothing."""
    sock = raw_connect(s)
    head = raw_post(path, b"{")
    sock.sendall(head.replace(b"content-length: 1\r\n", b"content-length: %d\r\n" % length))
    return sock


def test_a_stalled_body_gets_408_and_frees_its_connection(server_factory: Any) -> None:
    """A complete head, one byte of the body, then nothing: 408 in the path's dialect
    after --body-timeout and the connection closed, for a small body (the direct route)
    and a large one (the app reads it); meanwhile the connections it held past the cap
    still let a prober read /health, and once they are gone everyone is served."""
    with server_factory(["tiny-bge"], body_timeout=0.6, max_connections=4) as s:
        stalled = [
            _stalled_body(s, b"/embed", 1000),
            _stalled_body(s, b"/v1/embeddings", 1000),
            _stalled_body(s, b"/embed", 1_000_000),
            _stalled_body(s, b"/v1/embeddings", 1_000_000),
        ]
        started = time.monotonic()
        with raw_connect(s) as probe:  # past the cap: a probe is answered, then closed
            probe.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            [(line, headers, _)] = read_responses(probe, 1)
            assert line == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"
        for sock, tei in zip(stalled, (True, False, True, False), strict=True):
            refused(sock, b"408 Request Timeout", "body did not arrive within 0.6 seconds", tei)
            sock.close()
        assert 0.4 < time.monotonic() - started < 10
        assert _closed(s, "body_timeout") == 4
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert c.post("/embed", json={"inputs": "a"}).status_code == 200
        with raw_connect(s) as sock:  # a body in pieces within the deadline is served
            request = raw_post(b"/embed", b'{"inputs": "slow but in time"}')
            sock.sendall(request[:-8])
            time.sleep(0.3)
            sock.sendall(request[-8:])
            assert read_responses(sock, 1)[0][0] == b"HTTP/1.1 200 OK"


def test_header_lines_are_counted_and_capped(server_factory: Any) -> None:
    """Empty headers cost the server a list entry each: more than --max-headers lines get
    431, and --max-header-bytes counts each line's ': ' and line ending too."""
    with server_factory(["tiny-bge"], max_headers=50, max_header_bytes=4096) as s:
        for extra, said in (
            (b"x:\r\n" * 51, b"more than 50 header lines"),
            (b"x-a: \r\n" * 45 + b"y: " + b"z" * 3700 + b"\r\n", b"exceed 4096 bytes"),
        ):
            with raw_connect(s) as sock:
                sock.sendall(raw_post(b"/embed", b'{"inputs": "a"}', extra))
                [(line, _, body)] = read_responses(sock, 1)
                assert line == b"HTTP/1.1 431 Request Header Fields Too Large"
                assert said.decode() in orjson.loads(body)["error"]
        assert _closed(s, "headers_too_large") == 2
        with raw_connect(s) as sock:  # within both: served
            sock.sendall(raw_post(b"/embed", b'{"inputs": "a"}', b"x:\r\n" * 40))
            assert read_responses(sock, 1)[0][0] == b"HTTP/1.1 200 OK"


def _not_reading(s: Any, n: int) -> socket.socket:
    """A client that pipelines `n` requests for about 1.3 MB of answer each, reads none."""
    host, port = s.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect((host, int(port)))
    sock.settimeout(30)
    sock.sendall(raw_post(b"/embed", orjson.dumps({"inputs": ["a"] * 2048})) * n)
    return sock


def _read_all(sock: socket.socket) -> int:
    """Bytes read until the server closes the connection."""
    got = 0
    try:
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    return got


def test_a_client_that_reads_nothing_loses_its_connection(server_factory: Any) -> None:
    """Answers held for a client that reads none of them are dropped with its connection
    after --write-timeout (not kept until it closes); a reading client is unaffected."""
    n = 12  # about 16 MB of answers: more than the kernel's socket buffers take
    with server_factory(["tiny-bge"], max_client_batch_size=2048, write_timeout=0.5) as s:
        sock = _not_reading(s, n)
        wait_for(lambda: _closed(s, "write_timeout") == 1, what="the write timeout")
        got = _read_all(sock)
        sock.close()
        assert got < n * 1_000_000  # not all the answers: the held ones were dropped
        with httpx.Client(base_url=s.url, timeout=30) as c:
            r = c.post("/embed", json={"inputs": ["a"] * 2048})
            assert r.status_code == 200 and len(r.json()) == 2048


def test_answers_held_for_non_readers_stay_within_the_budget(server_factory: Any) -> None:
    """--max-unsent-bytes bounds what the process holds for clients that do not read,
    whatever their number: past it, the connections that stopped reading first are closed
    (counted as unsent_budget). Each client here asks for about 16 MB and reads none:
    what the kernel's socket buffers do not take (megabytes) is over the budget."""
    from embedsvc.http.stalled import STALLED

    budget = 300_000
    with server_factory(
        ["tiny-bge"], max_client_batch_size=2048, write_timeout=60, max_unsent_bytes=budget
    ) as s:
        socks = [_not_reading(s, 12) for _ in range(3)]
        wait_for(lambda: _closed(s, "unsent_budget") >= 2, what="the unsent budget")
        held = sum(p.transport.get_write_buffer_size() for p in list(STALLED))
        assert held <= budget
        for sock in socks:
            assert _read_all(sock) < 12 * 1_000_000
            sock.close()
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200
