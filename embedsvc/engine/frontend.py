"""The front end's side of the engine, shared by every model in a process: requests in
flight, their delivery, and the watch for closed connections.

`Frontend.send` hands tokenized requests to the engine core through the link (`core.py`
in one process, `remote.py` across two); `Frontend.deliver` takes one forward pass's
results and resolves their requests (futures, or the direct route's callbacks); one task
per process sweeps the requests in flight for closed connections (no task per request)
and cancels their work in the core.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from embedsvc.engine.cache import Key, VectorCache
from embedsvc.engine.core import CoreLink
from embedsvc.engine.types import CoreJob, EmbedRequest, EmbedResult, JobDone, JobFailed
from embedsvc.errors import (
    BackendError,
    ClientDisconnected,
    EmbedsvcError,
    EmptyInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnhealthyError,
    ValidationError,
)
from embedsvc.errors import ErrorKind as K
from embedsvc.metrics import Metrics, ModelMetrics, observe_many

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.05  # seconds between checks for closed connections

# What a callback-answered request's callback gets: (result, None) or (None, error).
OnDone = Callable[["EmbedResult | None", "BaseException | None"], None]


_ERRORS: dict[K, type[EmbedsvcError]] = {
    K.OVERLOADED: OverloadedError,
    K.UNHEALTHY: UnhealthyError,
    K.BACKEND: BackendError,
    K.VALIDATION: ValidationError,
    K.EMPTY: EmptyInputError,
    K.PAYLOAD_TOO_LARGE: PayloadTooLargeError,
}


class Callback:
    """A future's done / set_result / set_exception for a request answered from a
    callback (the HTTP protocol's direct route): the callback runs at once, on the loop,
    once. An asyncio future would run it a turn later, through a handle made for it."""

    __slots__ = ("_done", "_fn")

    def __init__(self, fn: OnDone) -> None:
        self._fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: EmbedResult) -> None:
        self._resolve(result, None)

    def set_exception(self, exc: BaseException) -> None:
        self._resolve(None, exc)

    def _resolve(self, result: EmbedResult | None, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._fn(result, exc)
        except Exception:  # one answer's fault must not stop the others being delivered
            log.exception("answering a request failed")


class Owner(Protocol):
    """The model a request is for, as the front end needs it (a ModelEngine)."""

    name: str
    metrics: ModelMetrics
    cache: VectorCache | None


@dataclass(eq=False, slots=True)
class Pending:
    """A request between `embed` and its result."""

    engine: Owner
    req: EmbedRequest
    future: asyncio.Future[EmbedResult] | Callback
    t0: float
    disconnected: Callable[[], bool] | None
    key: int = 0
    tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per input
    t1: float = 0.0
    estimate: int = 0  # tokens expected, counted in ModelEngine._unsent until sent
    cache_keys: list[Key] | None = None  # its inputs' keys in the model's vector cache


class Frontend:
    """One per process: request keys, delivery of results, the disconnect sweep."""

    def __init__(self, link: CoreLink, metrics: Metrics, tokenizer_threads: int) -> None:
        self.link = link
        self.metrics = metrics
        # Large tokenizer jobs run here, off the event loop.
        self.pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")
        self._keys = itertools.count(1)
        self._waiting: dict[int, Pending] = {}
        self._watched: dict[int, Pending] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._abandon: Callable[[], EmbedsvcError] | None = None
        # The loop results are delivered on, where requests come from. Kept because
        # asyncio.get_running_loop() makes a system call (getpid, for forks) each time.
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.link.attach(loop, self.deliver)

    def send(self, model: str, pendings: list[Pending], jobs: list[CoreJob]) -> None:
        if self._abandon is not None:
            for p in pendings:
                if not p.future.done():
                    p.future.set_exception(self._abandon())
            return
        for p in pendings:
            p.key = next(self._keys)
            self._waiting[p.key] = p
            if p.disconnected is not None:
                self._watched[p.key] = p
        for p, j in zip(pendings, jobs, strict=True):
            j.key = p.key
        self.link.submit(model, jobs)
        if self._watched and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def cancel(self, p: Pending) -> None:
        if p.key and self._waiting.pop(p.key, None) is not None:
            self._watched.pop(p.key, None)
            self.link.cancel(p.engine.name, [p.key])

    def deliver(self, done: list[JobDone], failed: list[JobFailed]) -> None:
        """On the loop: the results of one forward pass (or refusals) for this process."""
        now = time.perf_counter()
        answered: list[Pending] = []
        results: list[JobDone] = []
        for d in done:
            p = self._take(d.key)
            if p is not None:
                answered.append(p)
                results.append(d)
        # The phases are counted before any of these answers is written (a callback
        # writes its answer as soon as it is resolved).
        by_model: dict[str, list[Pending]] = {}
        for p in answered:
            by_model.setdefault(p.engine.name, []).append(p)
        for pendings in by_model.values():
            phase = pendings[0].engine.metrics.phase
            observe_many(phase["tokenization"], [p.t1 - p.t0 for p in pendings])
            observe_many(phase["total"], [now - p.t0 for p in pendings])
        for p, d in zip(answered, results, strict=True):
            times = (p.t1 - p.t0, d.queue_time, d.inference_time, now - p.t0)
            result = EmbedResult(
                d.vectors, p.tokens, *times, p.lengths, d.sparse, d.tokens, p.req.truncated
            )
            if p.cache_keys is not None and p.engine.cache is not None:
                p.engine.cache.store(p.cache_keys, result)
            p.future.set_result(result)
        for f in failed:
            p = self._take(f.key)
            if p is not None:
                error = _ERRORS.get(f.kind, BackendError)
                p.future.set_exception(error(f.message, param=f.param, retry_after=f.retry_after))

    def _take(self, key: int) -> Pending | None:
        """The request `key` leaves the ones in flight: it, if it is still to be answered."""
        p = self._waiting.pop(key, None)
        if p is None:
            return None
        self._watched.pop(key, None)
        return None if p.future.done() else p

    def fail_all(self, exc: BaseException, cancel: bool = False) -> None:
        """The core is gone (or silent): answer every request in flight with `exc` now;
        `cancel`: and tell the core to drop their work, should it ever read it."""
        waiting, self._waiting = self._waiting, {}
        self._watched.clear()
        if cancel:
            by_model: dict[str, list[int]] = {}
            for p in waiting.values():
                by_model.setdefault(p.engine.name, []).append(p.key)
            for model, keys in by_model.items():
                self.link.cancel(model, keys)
        for p in waiting.values():
            if not p.future.done():
                p.future.set_exception(exc)

    def abandon_all(self, error: Callable[[], EmbedsvcError]) -> int:
        """Give up on every request in flight, and on any sent from now on: its queued
        inputs are dropped in the core and it is answered with `error()` (the drain
        timeout passed). Returns how many were in flight."""
        self._abandon = error
        waiting = list(self._waiting.values())
        for p in waiting:
            if not p.future.done():
                log.warning(
                    "request %s: not finished within the drain timeout; answered 503",
                    p.req.request_id,
                )
        self.fail_all(error(), cancel=True)
        return len(waiting)

    async def _sweep(self) -> None:
        """Cancel the work of requests whose client hung up, while any are in flight."""
        try:
            while self._watched:
                await asyncio.sleep(SWEEP_INTERVAL)
                gone = [p for p in self._watched.values() if p.disconnected and p.disconnected()]
                for p in gone:
                    self.cancel(p)
                    if not p.future.done():
                        p.future.set_exception(ClientDisconnected())
        finally:
            self._sweeper = None
