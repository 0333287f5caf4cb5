"""The engine as the API sees it, on the front end's event loop.

Flow of one request:
  `ModelEngine.embed`: validate (no tokenization), join the model's pending list; the
      first request of a loop iteration schedules one flush
  flush: tokenize every pending request in one tokenizer call, refuse the ones that fail,
      hand the rest to the engine core through the link (`core.py`, `remote.py`)
  `Frontend.deliver` (frontend.py): results of one forward pass resolve their requests'
      futures (or, for the direct route, call their callbacks)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from embedsvc.backends.base import LoadedModel
from embedsvc.engine.admission import retry_after
from embedsvc.engine.cache import VectorCache
from embedsvc.engine.core import LocalCore
from embedsvc.engine.frontend import Callback, Frontend, OnDone, Pending
from embedsvc.engine.prepare import Preparer
from embedsvc.engine.tokenize import TokenInfo
from embedsvc.engine.types import (
    CoreJob,
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    Pairs,
    Sequences,
    Texts,
    TokenIds,
)
from embedsvc.engine.worker import ModelWorker
from embedsvc.errors import (
    EmbedsvcError,
    OverloadedError,
    UnhealthyError,
)
from embedsvc.settings import Settings

log = logging.getLogger(__name__)

# Flushes with more text than this are tokenized on a thread, so a huge client batch does
# not hold the event loop (smaller ones are cheaper inline than a thread hand-off).
INLINE_TOKENIZE_CHARS = 32_768


class ModelEngine:
    """One served model, as the API uses it: validation, prompts, embedding, tokenization."""

    def __init__(self, info: ModelInfo, settings: Settings, front: Frontend) -> None:
        self.info = info
        self.spec = info.spec
        self.name = info.name
        self.settings = settings
        self.metrics = front.metrics.for_model(info.name)
        self.prep = Preparer(info, settings)
        self.cache: VectorCache | None = None
        if settings.cache_bytes and info.task == "embed" and not info.spec.icl:
            namespace = f"{info.name}@{info.spec.revision}:{info.precision or info.dtype}"
            self.cache = VectorCache(namespace, settings.cache_bytes, self.metrics)
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
        keys = None
        if self.cache is not None:
            truncate = self.settings.auto_truncate if req.truncate is None else req.truncate
            keys = self.cache.keys(req, self.prep.prefix(req), truncate)
            cached = self.cache.lookup(keys) if keys is not None else None
            if cached is not None:  # every input answered before: no model work at all
                return self._answer_cached(req, cached, outcome)
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
        p.cache_keys = keys
        self._unsent_tokens += estimate
        self._unsent_inputs += req.size
        self._pending.append(p)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return p

    def _answer_cached(
        self, req: EmbedRequest, result: EmbedResult, outcome: Callback | None
    ) -> Pending:
        """A request answered from the vector cache, now, on the event loop."""
        loop = self._front.loop or asyncio.get_running_loop()
        future = outcome or loop.create_future()
        p = Pending(self, req, future, time.perf_counter(), None)
        future.set_result(result)
        return p

    def max_wait(self, req: EmbedRequest) -> float:
        """Seconds this request may wait: --max-queue-time, or the client's shorter
        x-request-timeout; 0 for no limit."""
        server = self.settings.max_queue_time
        if req.timeout is None:
            return server
        return min(server, req.timeout) if server > 0 else req.timeout

    def _estimate_tokens(self, req: EmbedRequest) -> int:
        inputs = req.inputs
        if isinstance(inputs, TokenIds):
            return sum(map(len, inputs.ids))
        if isinstance(inputs, Pairs):
            return int(req.chars * self._tokens_per_char) + 4 * len(inputs.documents)
        if isinstance(inputs, Sequences):
            return int(req.chars * self._tokens_per_char) + 3 * len(inputs.items)
        return int(req.chars * self._tokens_per_char) + 2 * len(inputs.texts)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        self._settle([p for p in batch if p.future.done()])
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        reqs = [p.req for p in batch]
        # With prompts, instructions and examples: what the tokenizer will be handed.
        chars = sum(r.chars for r in reqs)
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
            attended: list[int] | None = None
            skip = False
            if self.info.colbert is not None:  # markers applied; expansion and skiplist here
                ids, attended, skip = self.prep.colbert_ids(req, ids)
            p.lengths = list(map(len, ids))
            p.tokens = sum(p.lengths)
            p.t1 = now
            if isinstance(req.inputs, Texts):
                chars += sum(map(len, req.inputs.texts))
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
                    req.want,
                    attended,
                    skip,
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
