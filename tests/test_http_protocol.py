"""Responses in one write (embedsvc/http_protocol.py): what reaches the socket, and the
cases where a head has no body right after it, through a real server."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx

from embedsvc.http_protocol import LARGE, _HeadWithBody


class Recording(asyncio.Transport):
    """Keeps what is written, in order (the socket's side of the wrapper)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


def test_head_and_body_leave_in_one_write_and_a_lone_head_at_the_end_of_the_turn() -> None:
    async def run() -> list[list[bytes]]:
        loop = asyncio.get_running_loop()
        seen = []
        t = Recording()
        w = _HeadWithBody(t, loop)
        w.write(HEAD)
        w.write(b"hello")
        seen.append(list(t.writes))
        await asyncio.sleep(0)
        seen.append(list(t.writes))  # nothing left over to flush
        t.writes.clear()
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")  # a HEAD response
        seen.append(list(t.writes))
        await asyncio.sleep(0)
        seen.append(list(t.writes))
        t.writes.clear()
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # interim: never held
        seen.append(list(t.writes))
        t.writes.clear()
        w.write(HEAD)
        w.close()  # closing sends what is held first
        seen.append([*t.writes, b"closed" if t.closed else b"open"])
        t.writes.clear()
        t.closed = False
        big = b"x" * (LARGE + 1)
        w.write(HEAD)
        w.write(big)  # a large body is not copied to join it
        seen.append(list(t.writes))
        return seen

    seen = asyncio.run(run())
    assert seen[0] == [HEAD + b"hello"] and seen[1] == [HEAD + b"hello"]
    assert seen[2] == [] and seen[3] == [HEAD]
    assert seen[4] == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert seen[5] == [HEAD, b"closed"]
    assert seen[6] == [HEAD, b"x" * (LARGE + 1)]


def test_a_head_request_on_a_kept_alive_connection_is_answered(server: Any) -> None:
    """HEAD: a response head with no body write after it; the next request on the same
    connection must still get its own answer. The client waits less than uvicorn keeps an
    idle connection open (5 s), whose closing would send a held head anyway."""
    with httpx.Client(base_url=server.url, timeout=3) as client:
        r = client.head("/health")  # GET only: 405, a head without a body
        assert r.status_code == 405 and r.content == b""
        r = client.post("/embed", json={"inputs": "one more"})
        assert r.status_code == 200 and len(r.json()[0]) == 384


def test_expect_100_continue_gets_its_interim_answer(server: Any) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"inputs": "hello"}'
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        assert s.recv(64).startswith(b"HTTP/1.1 100 Continue")  # before the body is sent
        s.sendall(body)
        answer = b""
        while b"]]" not in answer:
            chunk = s.recv(65536)
            assert chunk
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"x-request-id" in answer
