"""The hostile clients of the second security review, against a real server on loopback:
what each holds of the server, and whether everyone else is still served.

    python loadtest/hostile.py                  # about 3 minutes, bundled MiniLM

1. stalled bodies: N connections send a whole `POST /embed` head (content-length 1000) and
   one byte of body, then nothing; a new client asks /health and /embed meanwhile and after
   --body-timeout;
2. empty headers: connections that each send 32,000 empty header lines, then stall;
3. unread answers: connections that each ask /embed_all for about 22 MB of token states
   and read nothing; the server's resident memory before, while, and after --write-timeout.

Every loop is bounded in count and time, and every target is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import contextlib

from throughput import free_port, start, stop


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return s


def closed(s: socket.socket) -> bool:
    """Whether the server has closed the connection: what arrived is read (and dropped)
    until the socket would block (still open) or ends."""
    s.setblocking(False)
    try:
        while s.recv(1 << 20):
            pass
        return True  # b"": the end
    except BlockingIOError:
        return False
    except OSError:
        return True


def closed_for(url: str, reason: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    name = f'embedsvc_connections_closed_total{{reason="{reason}"}} '
    return sum(float(x[len(name) :]) for x in text.splitlines() if x.startswith(name))


def probe(url: str) -> str:
    try:
        t0 = time.perf_counter()
        health = httpx.get(url + "/health", timeout=10).status_code
        embed = httpx.post(url + "/embed", json={"inputs": "still served?"}, timeout=10)
        return f"/health {health}, /embed {embed.status_code} ({time.perf_counter() - t0:.2f} s)"
    except httpx.HTTPError as e:
        return f"failed: {type(e).__name__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=4200, help="stalled bodies (1)")
    ap.add_argument("--empty-heads", type=int, default=500, help="connections of (2)")
    ap.add_argument("--unread", type=int, default=20, help="connections of (3)")
    ap.add_argument("--body-timeout", type=float, default=10.0)
    ap.add_argument("--write-timeout", type=float, default=30.0)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "embedsvc", "serve", "--port", str(port), "--log-level", "error"]
    cmd += ["--body-timeout", str(args.body_timeout), "--write-timeout", str(args.write_timeout)]
    cmd += ["--max-queue-time", "0"]  # (3): every answer is made, none refused for time
    server = start(cmd, port)
    pid = server.pid
    try:
        print(f"server pid {pid}: {rss_mb(pid):.0f} MB resident at start")
        # (1) stalled bodies
        head = b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        head += b"content-length: 1000\r\n\r\n{"
        socks = []
        for _ in range(args.connections):
            s = connect(port)
            s.sendall(head)
            socks.append(s)
        time.sleep(1)
        print(f"(1) {len(socks)} stalled bodies: {probe(url)}; {rss_mb(pid):.0f} MB")
        time.sleep(args.body_timeout + 2)
        held = sum(not closed(s) for s in socks)  # a 408 answered, then the close
        print(f"    {args.body_timeout + 3:.0f} s later: {held} still held; {probe(url)}")
        for s in socks:
            s.close()
        # (2) empty headers
        empty = b"POST /embed HTTP/1.1\r\nhost: x\r\n" + b"x:\r\n" * 32_000
        before = rss_mb(pid)
        socks, refused = [], 0
        for _ in range(args.empty_heads):
            s = connect(port)
            with contextlib.suppress(OSError):
                s.sendall(empty)
            socks.append(s)
        time.sleep(1)
        for s in socks:
            s.setblocking(True)
            s.settimeout(5)
            with contextlib.suppress(OSError):
                refused += s.recv(64).startswith(b"HTTP/1.1 431")
            s.close()
        print(
            f"(2) {args.empty_heads} heads of 32,000 empty headers: {refused} answered 431; "
            f"{before:.0f} -> {rss_mb(pid):.0f} MB; {probe(url)}"
        )
        # (3) unread answers
        # 21 inputs of 256 tokens: 2.06 M numbers, within --max-multivector-values
        body = json.dumps({"inputs": ["word " * 250] * 21, "truncate": True}).encode()
        ask = (
            b"POST /embed_all HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        before = rss_mb(pid)
        socks = []
        for _ in range(args.unread):
            s = connect(port)
            s.sendall(ask)
            socks.append(s)
        peak, t0 = before, time.monotonic()
        while time.monotonic() - t0 < args.write_timeout + 120:
            peak = max(peak, rss_mb(pid))
            if closed_for(url, "write_timeout") >= args.unread:
                break
            time.sleep(0.5)
        waited = time.monotonic() - t0
        dropped = sum(closed(s) for s in socks)
        print(
            f"(3) {args.unread} clients that read none of ~22 MB answers: {before:.0f} MB "
            f"before, {peak:.0f} MB at most, {rss_mb(pid):.0f} MB after {waited:.0f} s; "
            f"{dropped} connections closed by the server; {probe(url)}"
        )
        for s in socks:
            s.close()
        metrics = httpx.get(url + "/metrics").text
        lines = [x for x in metrics.splitlines() if x.startswith("embedsvc_connections_closed")]
        print("\n".join(lines))
    finally:
        stop(server)


if __name__ == "__main__":
    main()
