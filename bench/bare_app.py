"""The ceiling of the HTTP stack: a bare ASGI app on the same uvicorn (httptools, uvloop)
that parses the same JSON body and answers a constant 384-float vector.

Run: python bench/bare_app.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
import uvicorn

VECTOR = orjson.dumps([[0.05] * 384])


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "POST":
        orjson.loads(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(VECTOR))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": VECTOR})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
