"""The event loop's CPU time per request on the direct route, without sockets or a client.

    python bench/loop_cost.py                   # about a minute
    python bench/loop_cost.py --zero-passes     # forward passes replaced by zeros

64 connections are driven through embedsvc's HTTP protocol (`embedsvc/http/`) in this
process: each sends a TEI `/embed` body with one short query, and sends the next as soon as
its answer is written, to an app and engine built as `embedsvc serve` builds them, around
the tests' tiny BERT (2 layers, 32 wide). No kernel, no load generator, no second process
share the cores, so the loop's CPU per request (the thread's own clock) moves by a few
percent between runs, where requests/s under wrk move by 20-30%: the figure to compare
when a change shortens or lengthens the loop's path. With --zero-passes the model answers
zeros at once and the loop's share is about all there is; the cyclic collector's
collections during the run are counted as well. bench/frontend.py measures the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CONNECTIONS = 64
WARMUP = 5000


class Transport:
    """What the protocol writes to: a response hands the connection its next request."""

    def __init__(self, on_write: Any) -> None:
        self.on_write = on_write
        self.closing = False

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def zero_passes() -> None:
    """Every torch forward pass returns zeros (with a 1 in front: a unit vector)."""
    import numpy as np

    from embedsvc.backends import ForwardOutput, torch_backend

    def forward(self: Any, batch: Any) -> Any:
        out = np.zeros((batch.input_ids.shape[0], self.dimension), np.float32)
        out[:, 0] = 1
        return ForwardOutput(out)

    torch_backend.TorchBackend.forward = forward  # type: ignore[method-assign]


async def run(requests: int, models_file: str) -> dict[str, float]:
    import uvicorn
    from uvicorn.server import ServerState
    from workload import queries

    from embedsvc.api import create_app
    from embedsvc.engine.models import load_engines
    from embedsvc.http.protocol import EmbedsvcHttpProtocol
    from embedsvc.memory import settle_gc
    from embedsvc.metrics import Metrics
    from embedsvc.registry import load_registry
    from embedsvc.server import _uvicorn_config
    from embedsvc.settings import Settings

    settings = Settings(models_file=models_file, log_level="warning")
    metrics = Metrics()
    specs = load_registry(models_file).select(settings.model_names())
    engines = load_engines(specs, settings, metrics)
    app = create_app(settings, metrics, engines=engines)
    loop = asyncio.get_running_loop()
    engines.start(loop)
    app.state.service.engines = engines
    settle_gc()  # as after loading in `embedsvc serve`
    config: uvicorn.Config = _uvicorn_config(app, settings)
    config.load()
    state = ServerState()
    bodies = [b'{"inputs": "%s", "truncate": true}' % q.encode() for q in queries(2000)]
    wire = [
        b"POST /embed HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(b), b)
        for b in bodies
    ]
    rng = random.Random(0)
    answered = 0
    marks: dict[str, float] = {}
    finished: asyncio.Future[None] = loop.create_future()
    collections = 0

    def count(phase: str, info: dict[str, Any]) -> None:
        nonlocal collections
        collections += phase == "start"

    gc.callbacks.append(count)
    sent = 0
    drained: asyncio.Future[None] = loop.create_future()

    def connection() -> None:
        protocol = EmbedsvcHttpProtocol(config=config, server_state=state, app_state={}, _loop=loop)

        def on_write(data: bytes) -> None:
            nonlocal answered
            if not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {data[:200]!r}")
            answered += 1
            if answered == WARMUP:
                marks.update(wall=time.perf_counter(), cpu=time.thread_time(), gc=collections)
            if answered == WARMUP + requests and not finished.done():
                finished.set_result(None)
            if answered < WARMUP + requests:
                loop.call_soon(send)
            elif answered == sent and not drained.done():
                drained.set_result(None)  # the last answers after the measurement

        def send() -> None:
            nonlocal sent
            sent += 1
            protocol.data_received(wire[rng.randrange(len(wire))])

        protocol.connection_made(Transport(on_write))  # type: ignore[arg-type]
        send()

    for _ in range(CONNECTIONS):
        connection()
    await finished
    wall = time.perf_counter() - marks["wall"]
    cpu = time.thread_time() - marks["cpu"]
    gc_runs = collections - marks["gc"]
    await drained
    gc.callbacks.remove(count)
    engines.stop()
    return {
        "rps": requests / wall,
        "loop_us": cpu / requests * 1e6,
        "gc_per_1000": gc_runs / requests * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=150_000)
    parser.add_argument("--zero-passes", action="store_true", help="forward passes answer zeros")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.zero_passes:
        zero_passes()
    import uvloop
    from frontend import tiny_models_file

    with tempfile.TemporaryDirectory() as tmp:
        r = uvloop.run(run(args.requests, tiny_models_file(Path(tmp))))
    print(
        f"{args.requests} requests, {CONNECTIONS} connections, tiny model"
        f"{' (passes answer zeros)' if args.zero_passes else ''}: {r['rps']:,.0f} requests/s, "
        f"event loop {r['loop_us']:.2f} us of CPU per request, "
        f"{r['gc_per_1000']:.2f} GC collections per 1000 requests"
    )


if __name__ == "__main__":
    main()
