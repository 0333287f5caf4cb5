"""The engine core in its own process, and the link that front-end processes use to reach it.

Transport: ZeroMQ over an ipc:// socket. The engine process binds a ROUTER
(`EngineServer`); each front-end process connects a DEALER (`RemoteCore`) with an
identity of its own. One message per batch each way, never one per request:

  front end -> engine: ("hello",)                      when it starts
                       ("submit", model, [CoreJob...])  one per tokenizer flush
                       ("cancel", model, [key...])      clients that hung up
                       ("ping",)                        every HEARTBEAT seconds
  engine -> front end: ("infos", [ModelInfo...] | "error text")
                       ("results", [JobDone...], [JobFailed...],
                        {model: (inflight, healthy, tokens ahead, tokens/s)})
                                                        one per forward pass and front end
                       ("pong", {model: (...)})         the answer to a ping

Liveness: a front end that has heard nothing from the engine for SILENCE seconds (an engine
process that hangs, or is stopped, rather than dies) reports its models unhealthy (/health
503, new requests 503), answers its requests in flight with 503 and cancels their work;
the engine's next message makes it healthy again.

Payloads are pickles (protocol 5: numpy arrays travel as raw bytes). The ipc socket lives
in a private temporary folder that only this server's processes know.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
from collections.abc import Callable, Hashable
from typing import Any, cast

import zmq
import zmq.asyncio

from embedsvc.engine.core import Deliver
from embedsvc.engine.types import CoreJob, JobDone, JobFailed, ModelInfo
from embedsvc.engine.worker import ModelWorker
from embedsvc.errors import ConfigError

log = logging.getLogger(__name__)

# The status of a model the engine has not reported: nothing in flight, not healthy.
_GONE = (0, False, 0, 0.0)

_RESULTS = "inproc://embedsvc-results"
HEARTBEAT = 0.5  # seconds between a front end's pings
SILENCE = 3.0  # seconds without a word from the engine before a front end gives up on it


def _dumps(msg: tuple[Any, ...]) -> bytes:
    return pickle.dumps(msg, protocol=5)


class EngineServer:
    """Serves the model workers of this process to front-end processes."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        # Results come from the compute thread and control messages from others; each
        # thread pushes through a socket of its own, and only the server thread sends.
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(_RESULTS)
        self._push = threading.local()
        self.workers: dict[str, ModelWorker] = {}
        self._infos: list[ModelInfo] | str | None = None
        self._waiting: list[bytes] = []  # front ends that said hello before loading ended
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def loaded(self, workers: dict[str, ModelWorker]) -> None:
        """Loading finished: start the workers and answer the front ends (any thread)."""
        self.workers = workers
        for w in workers.values():
            w.start(self._sink)
        self._send_control(("loaded", [w.info() for w in workers.values()]))

    def failed(self, reason: str) -> None:
        self._send_control(("loaded", reason))

    def forget(self, origin: bytes) -> None:
        """A front end has gone: drop the work it had in flight (any thread)."""
        for w in self.workers.values():
            w.forget(origin)

    def stop(self) -> None:
        self._stopped = True
        self._send_control(("stop",))
        self._thread.join(timeout=5)
        for w in self.workers.values():
            w.stop()

    # ---- threads other than the server's -------------------------------------------------

    def _pusher(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] | None = getattr(self._push, "sock", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.connect(_RESULTS)
            self._push.sock = sock
        return sock

    def _send_control(self, msg: tuple[Any, ...]) -> None:
        self._pusher().send_multipart([b"", _dumps(msg)])

    def _status(self) -> dict[str, tuple[int, bool, int, float]]:
        return {
            n: (w.inflight_inputs, w.ready and w.healthy, w.tokens_ahead, w.rate.rate)
            for n, w in self.workers.items()
        }

    def _sink(self, origin: Hashable, done: list[JobDone], failed: list[JobFailed]) -> None:
        assert isinstance(origin, bytes)
        payload = _dumps(("results", done, failed, self._status()))
        self._pusher().send_multipart([origin, payload])

    # ---- the server thread -----------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.inbox, zmq.POLLIN)
        while not self._stopped:
            for sock, _ in poller.poll():
                if sock is self.inbox:
                    origin, payload = self.inbox.recv_multipart()
                    if origin:
                        self.router.send_multipart([origin, payload])
                    else:
                        self._control(pickle.loads(payload))
                else:
                    origin, payload = self.router.recv_multipart()
                    try:
                        self._request(origin, pickle.loads(payload))
                    except Exception:
                        log.exception("engine: bad message from front end %r", origin)

    def _control(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "loaded":
            self._infos = msg[1]
            for origin in self._waiting:
                self.router.send_multipart([origin, _dumps(("infos", self._infos))])
            self._waiting.clear()

    def _request(self, origin: bytes, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "submit":
            _, model, jobs = msg
            refused = self.workers[model].submit(origin, jobs)
            if refused:
                payload = _dumps(("results", [], refused, self._status()))
                self.router.send_multipart([origin, payload])
        elif kind == "cancel":
            _, model, keys = msg
            self.workers[model].cancel(origin, keys)
        elif kind == "ping":
            self.router.send_multipart([origin, _dumps(("pong", self._status()))])
        elif kind == "hello":
            if self._infos is None:
                self._waiting.append(origin)
            else:
                self.router.send_multipart([origin, _dumps(("infos", self._infos))])


class RemoteCore:
    """A front end's link to the engine process (implements core.CoreLink)."""

    def __init__(self, address: str, identity: bytes) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self._status: dict[str, tuple[int, bool, int, float]] = {}
        self._sent: dict[str, int] = {}  # tokens submitted since the last report
        self._reader: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._heard = 0.0  # loop time of the engine's last message
        self.silent = False  # nothing heard for SILENCE seconds
        # Called on the loop when the engine falls silent (the front end answers what is
        # in flight); set by whoever builds the front end.
        self.on_silence: Callable[[], None] | None = None

    async def hello(self) -> list[ModelInfo]:
        """Wait until the engine has loaded its models; their descriptions."""
        await self.sock.send(_dumps(("hello",)))
        kind, infos = pickle.loads(await self.sock.recv())
        assert kind == "infos"
        if isinstance(infos, str):
            raise ConfigError(infos)
        # Until the engine's first report: its rate as measured at warm-up.
        self._status = {i.name: (0, True, 0, i.tokens_per_second) for i in infos}
        return list(infos)

    def attach(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self._heard = loop.time()
        self._reader = loop.create_task(self._read(deliver))
        self._heartbeat = loop.create_task(self._beat(loop))

    async def _read(self, deliver: Deliver) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = pickle.loads(await self.sock.recv())
            self._heard = loop.time()
            if self.silent:
                self.silent = False
                log.warning("front end: the engine process answers again")
            if msg[0] == "results":
                _, done, failed, status = msg
                self._status = status
                self._sent.clear()
                deliver(done, failed)
            elif msg[0] == "pong":
                self._status = msg[1]

    async def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            if loop.time() - self._heard > SILENCE:
                if not self.silent:
                    self.silent = True
                    log.error(
                        "front end: no word from the engine process for %.0f s; reporting "
                        "unhealthy and answering the requests in flight with 503",
                        SILENCE,
                    )
                if self.on_silence is not None:  # also those sent since the last beat
                    self.on_silence()
            self._send(("ping",))

    def _send(self, msg: tuple[Any, ...]) -> None:
        # Sent at once unless the engine lags 1000 messages behind; then queued in order.
        fut = cast("asyncio.Future[Any]", self.sock.send(_dumps(msg)))
        fut.add_done_callback(_log_failure)

    def submit(self, model: str, jobs: list[CoreJob]) -> None:
        # Counted as queued until the engine's next report includes them.
        self._sent[model] = self._sent.get(model, 0) + sum(j.tokens for j in jobs)
        self._send(("submit", model, jobs))

    def cancel(self, model: str, keys: list[int]) -> None:
        self._send(("cancel", model, keys))

    def inflight(self, model: str) -> int:
        return self._status.get(model, _GONE)[0]

    def healthy(self, model: str) -> bool:
        return not self.silent and self._status.get(model, _GONE)[1]

    def estimate_wait(self, model: str, tokens: int, ahead: int = 0) -> float:
        _, _, queued, rate = self._status.get(model, _GONE)
        ahead += queued + self._sent.get(model, 0)
        return (ahead + tokens) / rate if ahead > 0 and rate > 0 else 0.0

    def stop(self) -> None:
        for task in (self._reader, self._heartbeat):
            if task is not None:
                task.cancel()
        self.sock.close()
        self.ctx.term()


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("front end: cannot send to the engine: %s", fut.exception())
