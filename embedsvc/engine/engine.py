"""The engine as the API sees it, on the front end's event loop.

Flow of one request:
  `ModelEngine.embed`: validate (no tokenization), join the model's pending list; the
      first request of a loop iteration schedules one flush
  flush: tokenize every pending request in one tokenizer call, refuse the ones that fail,
      hand the rest to the engine core through the link (`core.py`, `remote.py`)
  `Frontend.deliver`: results of one forward pass resolve their requests' futures (or,
      for the direct route, call their callbacks)
  `Frontend` also sweeps the in-flight requests for closed connections, in one task per
      process (no task per request), and cancels their work in the core.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from embedsvc.backends.base import LoadedModel
from embedsvc.engine.admission import retry_after
from embedsvc.engine.core import CoreLink, LocalCore
from embedsvc.engine.prepare import Preparer
from embedsvc.engine.tokenize import TokenInfo
from embedsvc.engine.types import (
    CoreJob,
    EmbedRequest,
    EmbedResult,
    JobDone,
    JobFailed,
    ModelInfo,
)
from embedsvc.engine.worker import ModelWorker
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
from embedsvc.metrics import Metrics, observe_many
from embedsvc.settings import Settings

log = logging.getLogger(__name__)

# Flushes with more text than this are tokenized on a thread, so a huge client batch does
# not hold the event loop (smaller ones are cheaper inline than a thread hand-off).
INLINE_TOKENIZE_CHARS = 32_768
SWEEP_INTERVAL = 0.05  # seconds between checks for closed connections

_ERRORS: dict[K, type[EmbedsvcError]] = {
    K.OVERLOADED: OverloadedError,
    K.UNHEALTHY: UnhealthyError,
    K.BACKEND: BackendError,
    K.VALIDATION: ValidationError,
    K.EMPTY: EmptyInputError,
    K.PAYLOAD_TOO_LARGE: PayloadTooLargeError,
}


# What a callback-answered request's callback gets: (result, None) or (None, error).
OnDone = Callable[["EmbedResult | None", "BaseException | None"], None]


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


@dataclass(eq=False, slots=True)
class Pending:
    """A request between `embed` and its result."""

    engine: ModelEngine
    req: EmbedRequest
    future: asyncio.Future[EmbedResult] | Callback
    t0: float
    disconnected: Callable[[], bool] | None
    key: int = 0
    tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per input
    t1: float = 0.0
    estimate: int = 0  # tokens expected, counted in ModelEngine._unsent until sent


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
            p.future.set_result(EmbedResult(d.vectors, p.tokens, *times, p.lengths, d.sparse))
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


class ModelEngine:
    """One served model, as the API uses it: validation, prompts, embedding, tokenization."""

    def __init__(self, info: ModelInfo, settings: Settings, front: Frontend) -> None:
        self.info = info
        self.spec = info.spec
        self.name = info.name
        self.settings = settings
        self.metrics = front.metrics.for_model(info.name)
        self.prep = Preparer(info, settings)
        self._front = front
        self._pending: list[Pending] = []
        self._flush_scheduled = False
        self._tokens_per_char = 0.3  # English in WordPiece: about 3-4 characters a token
        self._unsent_tokens = 0  # estimated tokens of requests not yet sent to the core
        self._unsent_inputs = 0

    # ---- info ------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self.info.dimension

    @property
    def healthy(self) -> bool:
        """Loaded, warmed and able to serve."""
        return self._front.link.healthy(self.name)

    ready = healthy

    @property
    def inflight_inputs(self) -> int:
        return self._front.link.inflight(self.name)

    def queue_time_estimate(self) -> float:
        """Seconds the tokens admitted now would take the model to get through."""
        return self._front.link.estimate_wait(self.name, 0)

    @property
    def worker(self) -> ModelWorker:
        """The model's worker, when the core runs in this process (tests reach into it)."""
        link = self._front.link
        if not isinstance(link, LocalCore):
            raise RuntimeError(f"model {self.name} runs in another process")
        return link.workers[self.name]

    @property
    def model(self) -> LoadedModel:
        return self.worker.model

    def allowed_dimensions(self) -> list[int]:
        return self.info.allowed_dimensions()

    def resolve_prompt(self, prompt_name: str | None, param: str = "prompt_name") -> str:
        return self.prep.resolve_prompt(prompt_name, param)

    def check_dimensions(self, dimensions: int | None) -> None:
        self.prep.check_dimensions(dimensions)

    def validate(self, req: EmbedRequest) -> None:
        if not self.healthy:
            raise UnhealthyError(f"model {self.name} is not healthy")
        self.prep.validate(req)

    # ---- embedding -------------------------------------------------------------------

    async def embed(
        self, req: EmbedRequest, disconnected: Callable[[], bool] | None = None
    ) -> EmbedResult:
        """Embed one request. `disconnected()` says whether its client has gone."""
        p = self._admit(req, disconnected)
        assert isinstance(p.future, asyncio.Future)
        try:
            return await p.future
        except asyncio.CancelledError:
            self._front.cancel(p)
            raise

    def submit(
        self, req: EmbedRequest, disconnected: Callable[[], bool] | None, on_done: OnDone
    ) -> None:
        """`embed` without a coroutine, for callers that answer from a callback: admit the
        request (or raise the error that refuses it); `on_done(result, error)` is called
        once, on the event loop, when its vectors are ready or it fails. Once
        `disconnected()` says the client has gone, the request's work is dropped and it
        fails with ClientDisconnected."""
        self._admit(req, disconnected, Callback(on_done))

    def _admit(
        self,
        req: EmbedRequest,
        disconnected: Callable[[], bool] | None,
        outcome: Callback | None = None,
    ) -> Pending:
        self.validate(req)
        # The core decides admission; these checks, on the core's last figures and an
        # estimate of the tokens, refuse before tokenizing: a 429 costs next to nothing.
        limit = self.settings.max_concurrent_inputs
        inflight = self.inflight_inputs + self._unsent_inputs
        if inflight + req.size > limit:
            self.metrics.refusals["capacity"].inc()
            raise OverloadedError(
                f"model {self.name} is at capacity ({inflight} of {limit} inputs in "
                "flight); retry shortly",
                retry_after=1,
            )
        max_wait = self.max_wait(req)
        estimate = self._estimate_tokens(req)
        if max_wait > 0:
            # Requests taken here and not yet tokenized and sent count as queued ahead:
            # a burst that arrives at once is decided at once, not after tokenizing it.
            wait = self._front.link.estimate_wait(self.name, estimate, self._unsent_tokens)
            if wait > max_wait:
                self.metrics.refusals["queue_time"].inc()
                raise OverloadedError(
                    f"model {self.name} would answer this request in about {wait:.1f} s, "
                    f"more than its limit of {max_wait:g} s; retry later or elsewhere",
                    retry_after=retry_after(wait, max_wait),
                )
        loop = self._front.loop or asyncio.get_running_loop()
        future = outcome or loop.create_future()
        p = Pending(self, req, future, time.perf_counter(), disconnected)
        p.estimate = estimate
        self._unsent_tokens += estimate
        self._unsent_inputs += req.size
        self._pending.append(p)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return p

    def max_wait(self, req: EmbedRequest) -> float:
        """Seconds this request may wait: --max-queue-time, or the client's shorter
        x-request-timeout; 0 for no limit."""
        server = self.settings.max_queue_time
        if req.timeout is None:
            return server
        return min(server, req.timeout) if server > 0 else req.timeout

    def _estimate_tokens(self, req: EmbedRequest) -> int:
        if req.token_ids is not None:
            return sum(map(len, req.token_ids))
        if req.pairs is not None:
            chars = sum(len(q) + len(d) for q, d in req.pairs)
            return int(chars * self._tokens_per_char) + 4 * len(req.pairs)
        assert req.texts is not None
        return int(sum(map(len, req.texts)) * self._tokens_per_char) + 2 * len(req.texts)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        self._settle([p for p in batch if p.future.done()])
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        reqs = [p.req for p in batch]
        chars = sum(sum(map(len, r.texts)) for r in reqs if r.texts is not None)
        chars += sum(len(q) + len(d) for r in reqs if r.pairs is not None for q, d in r.pairs)
        if chars <= INLINE_TOKENIZE_CHARS:
            try:
                results = self.prep.tokenize_many(reqs)
            except Exception as e:  # a tokenizer fault: fail these requests, not the loop
                self._send(batch, e)
                return
            self._send(batch, results)
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._front.pool, self.prep.tokenize_many, reqs)
        fut.add_done_callback(lambda f: self._send(batch, f.exception() or f.result()))

    def _settle(self, batch: list[Pending]) -> None:
        """These requests leave the front end's unsent count."""
        for p in batch:
            self._unsent_tokens -= p.estimate
            self._unsent_inputs -= p.req.size

    def _send(
        self, batch: list[Pending], results: list[list[list[int]] | EmbedsvcError] | BaseException
    ) -> None:
        self._settle(batch)
        if isinstance(results, BaseException):
            log.error("tokenizing %d requests failed", len(batch), exc_info=results)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(results)
            return
        now = time.perf_counter()
        sent: list[Pending] = []
        jobs: list[CoreJob] = []
        chars = tokens = 0
        # Nomic's layer norm belongs to truncation: the full size equals no `dimensions`.
        ln = self.spec.matryoshka_layer_norm
        full = self.info.dimension
        for p, ids in zip(batch, results, strict=True):
            if p.future.done():
                continue  # cancelled while it was tokenized
            if isinstance(ids, EmbedsvcError):
                p.future.set_exception(ids)
                continue
            req = p.req
            p.lengths = list(map(len, ids))
            p.tokens = sum(p.lengths)
            sparse = req.task == "sparse"
            p.t1 = now
            if req.texts is not None:
                chars += sum(map(len, req.texts))
                tokens += p.tokens - 2 * len(ids)
            jobs.append(
                CoreJob(
                    0,
                    ids,
                    p.tokens,
                    req.dimensions,
                    req.normalize,
                    ln and req.dimensions is not None and req.dimensions < full,
                    self.max_wait(req),
                    sparse and self.spec.task == "embed",  # BGE-M3's lexical weights
                    sparse,
                )
            )
            sent.append(p)
        if chars:  # tokens per character of recent texts, for _estimate_tokens
            self._tokens_per_char = 0.9 * self._tokens_per_char + 0.1 * max(tokens, 0) / chars
        if jobs:
            self._front.send(self.name, sent, jobs)

    # ---- tokenizer routes --------------------------------------------------------------

    async def tokenize(
        self, texts: list[str], prompt_name: str | None, add_special_tokens: bool
    ) -> list[list[TokenInfo]]:
        """Per-token detail of `texts`, within the request bounds that embedding takes:
        characters per text and inputs per request before tokenizing, tokens in all
        before a record is made for any of them."""
        prefix = self.prep.resolve_prompt(prompt_name)
        self.prep.check_inputs(texts, "inputs")
        return await asyncio.get_running_loop().run_in_executor(
            self._front.pool,
            functools.partial(
                self.prep.tokenizer.tokens,
                texts,
                prefix=prefix,
                add_special_tokens=add_special_tokens,
                max_tokens=self.prep.settings.max_request_tokens,
            ),
        )

    def decode(self, seqs: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return self.prep.tokenizer.decode(seqs, skip_special_tokens=skip_special_tokens)
