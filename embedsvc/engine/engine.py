"""One engine per model: admission, prompts, tokenization, the batch queue, a batcher
thread, post-processing and delivery; forward passes run on the shared compute thread.

Flow of one request:
  event loop: admit (count inputs, 429 if full) -> tokenize in a thread pool ->
              enqueue items -> await the job's future
  batcher thread: when the model is free, take the next batch from the queue, drop
              cancelled inputs, pad, hand it to the compute thread (on CUDA one more
              batch is formed while the previous one runs)
  compute thread (shared by all models, see compute.py): forward pass -> finalize
              vectors -> deliver to the loop in one call; on CPU it then takes the next
              batch itself while the queue is not empty
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from embedsvc.backends.base import BackendOutOfMemory, LoadedModel, PaddedBatch
from embedsvc.engine.batcher import BatchQueue, Item, pad
from embedsvc.engine.compute import compute_thread
from embedsvc.engine.postprocess import finalize
from embedsvc.engine.tokenize import TextTokenizer, TokenInfo
from embedsvc.errors import (
    BackendError,
    EmptyInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnhealthyError,
    ValidationError,
)
from embedsvc.metrics import Metrics
from embedsvc.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class EmbedRequest:
    """An embedding job as the API hands it over (already parsed, dialect-free)."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    prompt_name: str | None = None
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: str = "right"
    dimensions: int | None = None
    input_param: str = "inputs"
    request_id: str = ""

    @property
    def size(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass
class EmbedResult:
    vectors: np.ndarray  # float32 [n, d]
    prompt_tokens: int
    tokenization_time: float
    queue_time: float
    inference_time: float
    total_time: float


@dataclass(eq=False)
class Job:
    size: int
    future: asyncio.Future[None]
    dimensions: int | None
    normalize: bool
    layer_norm: bool
    rows: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0
    # Large requests enter the queue chunk by chunk (see ModelEngine._enqueue).
    chunk_remaining: list[int] = field(default_factory=list)
    waiting_chunks: list[list[Item]] = field(default_factory=list)
    cancelled: bool = False
    first_start: float = 0.0
    last_end: float = 0.0


class ModelEngine:
    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.spec = model.spec
        self.name = model.spec.name
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = TextTokenizer(model.tokenizer, model.max_seq_length)
        self.max_batch_tokens = settings.batch_tokens_for(model.backend.device)
        self.queue = BatchQueue(self.max_batch_tokens, settings.max_batch_size)
        # Batches handed to the compute thread and not finished. On CUDA a forward pass is
        # short and runs asynchronously, so one batch is formed and padded while the
        # previous one runs. On CPU a forward pass takes tens of milliseconds or more, and
        # a batch formed that early would hold only what was queued when the previous
        # one started; forming it when the model is free takes what arrived meanwhile.
        # On CPU the compute thread also takes the next batch itself as soon as it is free
        # (a continuation queued behind other models' work), so no thread hand-off sits
        # between two forward passes while the queue is non-empty.
        self._prefetch = model.backend.device.startswith("cuda")
        self._slots = threading.Semaphore(2 if self._prefetch else 1)
        self.compute = compute_thread()
        self._tok_pool = ThreadPoolExecutor(
            settings.tokenization_workers, thread_name_prefix=f"tok-{self.name}"
        )
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0
        self.ready = False
        self.healthy = True
        # Called (from a worker thread) when the engine cannot go on.
        self.on_fatal: Callable[[str], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._threads = [
            threading.Thread(target=self._batch_loop, name=f"batch-{self.name}", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def warmup(self) -> None:
        """Run a forward pass before reporting ready (first-call costs, shape checks)."""
        ids = self.tokenizer.encode(
            ["warm up"], prefix="", truncate=True, direction="right", param="inputs"
        )
        batch = pad([Item(None, 0, ids[0])], self.model.pad_token_id)
        out = self.compute.call(lambda: self.model.backend.forward(batch))
        if out.shape != (1, self.model.backend.dimension):
            raise RuntimeError(f"warm-up returned shape {out.shape}")
        self.ready = True
        self.metrics.model_ready.labels(self.name).set(1)

    def stop(self) -> None:
        self.queue.close()
        self._slots.release()
        for t in self._threads:
            t.join(timeout=5)
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # ---- info ------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self.model.backend.dimension

    @property
    def inflight_inputs(self) -> int:
        return self._inflight

    def allowed_dimensions(self) -> list[int]:
        return sorted({self.dimension, *self.spec.matryoshka_dims}, reverse=True)

    # ---- request path (event loop) -----------------------------------------------------

    def resolve_prompt(self, prompt_name: str | None, param: str = "prompt_name") -> str:
        if prompt_name is None:
            return ""
        prompts = self.spec.prompts
        if prompt_name not in prompts:
            allowed = ", ".join(sorted(prompts)) if prompts else "none (this model has no prompts)"
            raise ValidationError(
                f"{param} {prompt_name!r} is not a prompt of model {self.name}; allowed: {allowed}",
                param=param,
            )
        return prompts[prompt_name]

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        allowed = self.allowed_dimensions()
        if dimensions not in allowed:
            raise ValidationError(
                f"dimensions {dimensions} is not supported by model {self.name}; allowed: "
                f"{', '.join(map(str, allowed))}",
                param="dimensions",
            )

    def _prepare(self, req: EmbedRequest) -> list[list[int]]:
        truncate = self.settings.auto_truncate if req.truncate is None else req.truncate
        direction = req.truncation_direction
        if req.texts is not None:
            prefix = self.resolve_prompt(req.prompt_name)
            ids = self.tokenizer.encode(
                req.texts,
                prefix=prefix,
                truncate=truncate,
                direction=direction,
                param=req.input_param,
            )
        else:
            assert req.token_ids is not None
            ids = self.tokenizer.check_ids(
                req.token_ids, truncate=truncate, direction=direction, param=req.input_param
            )
        total = sum(len(x) for x in ids)
        if total > self.settings.max_request_tokens:
            raise PayloadTooLargeError(
                f"{req.input_param} has {total} tokens in total, more than max_request_tokens "
                f"({self.settings.max_request_tokens}); send fewer inputs per request",
                param=req.input_param,
            )
        return ids

    def validate(self, req: EmbedRequest) -> None:
        """Checks that need no tokenization; raise before anything is admitted."""
        if not self.healthy:
            raise UnhealthyError(f"model {self.name} is not healthy")
        if not self.ready:
            raise UnhealthyError(f"model {self.name} is still loading")
        if req.size == 0:
            raise EmptyInputError(f"{req.input_param} is empty", param=req.input_param)
        if req.texts is not None and any(t == "" for t in req.texts):
            i = req.texts.index("")
            where = f"{req.input_param}[{i}]" if req.size > 1 else req.input_param
            raise EmptyInputError(f"{where} is an empty string", param=req.input_param)
        if req.texts is not None:
            limit = self.settings.max_input_chars
            long_at = next((i for i, t in enumerate(req.texts) if len(t) > limit), None)
            if long_at is not None:
                where = f"{req.input_param}[{long_at}]" if req.size > 1 else req.input_param
                raise ValidationError(
                    f"{where} has {len(req.texts[long_at])} characters, more than "
                    f"max_input_chars ({limit}); split the text",
                    param=req.input_param,
                )
        if req.token_ids is not None and req.prompt_name is not None:
            raise ValidationError(
                "a prompt cannot be applied to token-id input; send text, or tokenize the "
                "prompt and the text together with /tokenize",
                param="prompt_name",
            )
        if req.size > self.settings.max_concurrent_inputs:
            raise PayloadTooLargeError(
                f"{req.input_param} has {req.size} inputs; this server admits at most "
                f"{self.settings.max_concurrent_inputs} at once (max_concurrent_inputs), so "
                "send them in several requests",
                param=req.input_param,
            )
        self.resolve_prompt(req.prompt_name)
        self.check_dimensions(req.dimensions)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        self.validate(req)
        n = req.size
        limit = self.settings.max_concurrent_inputs
        if self._inflight + n > limit:
            raise OverloadedError(
                f"model {self.name} is at capacity ({self._inflight} of {limit} inputs in "
                "flight); retry shortly"
            )
        self._inflight += n
        self.metrics.inflight_inputs.labels(self.name).set(self._inflight)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        job: Job | None = None
        try:
            ids = await loop.run_in_executor(self._tok_pool, self._prepare, req)
            t1 = time.perf_counter()
            job = Job(
                size=n,
                future=loop.create_future(),
                dimensions=req.dimensions,
                normalize=req.normalize,
                layer_norm=self.spec.matryoshka_layer_norm and req.dimensions is not None,
                rows=[None] * n,
                remaining=n,
            )
            self._enqueue(job, ids)
            await job.future
            t2 = time.perf_counter()
            vectors = np.stack(job.rows)  # type: ignore[arg-type]
            tokens = sum(len(s) for s in ids)
            result = EmbedResult(
                vectors=vectors,
                prompt_tokens=tokens,
                tokenization_time=t1 - t0,
                queue_time=max(job.first_start - t1, 0.0),
                inference_time=max(job.last_end - job.first_start, 0.0),
                total_time=t2 - t0,
            )
            self._observe(result, n)
            return result
        except asyncio.CancelledError:
            if job is not None:
                job.cancelled = True
            raise
        finally:
            self._inflight -= n
            self.metrics.inflight_inputs.labels(self.name).set(self._inflight)

    def _enqueue(self, job: Job, ids: list[list[int]]) -> None:
        """Queue the job's inputs. A request larger than max_client_batch_size is split
        into chunks of that size and at most two chunks are queued at a time: the next one
        follows when one completes, so other requests' inputs get in between and one big
        client batch cannot hold the model for its whole duration."""
        size = self.settings.max_client_batch_size
        chunks = [
            [Item(job, i, ids[i], chunk=k) for i in range(start, min(start + size, len(ids)))]
            for k, start in enumerate(range(0, len(ids), size))
        ]
        job.chunk_remaining = [len(c) for c in chunks]
        job.waiting_chunks = chunks[2:]
        self.queue.put([it for c in chunks[:2] for it in c])
        self.metrics.queue_size.labels(self.name).set(len(self.queue))

    def _observe(self, r: EmbedResult, n: int) -> None:
        d = self.metrics.duration
        d.labels(self.name, "tokenization").observe(r.tokenization_time)
        d.labels(self.name, "queue").observe(r.queue_time)
        d.labels(self.name, "inference").observe(r.inference_time)
        d.labels(self.name, "total").observe(r.total_time)
        self.metrics.inputs.labels(self.name).inc(n)
        self.metrics.tokens.labels(self.name).inc(r.prompt_tokens)

    async def tokenize(
        self, texts: list[str], prompt_name: str | None, add_special_tokens: bool
    ) -> list[list[TokenInfo]]:
        prefix = self.resolve_prompt(prompt_name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tok_pool,
            lambda: self.tokenizer.tokens(
                texts, prefix=prefix, add_special_tokens=add_special_tokens
            ),
        )

    # ---- worker threads --------------------------------------------------------------

    def _batch_loop(self) -> None:
        try:
            while True:
                self._slots.acquire()
                items = self.queue.take()
                if items is None:
                    return
                self.metrics.queue_size.labels(self.name).set(len(self.queue))
                live = [it for it in items if not it.job.cancelled]
                if not live:
                    self._slots.release()
                    continue
                batch = pad(live, self.model.pad_token_id)
                self.compute.submit(functools.partial(self._run_batch, live, batch))
        except BaseException:
            log.critical("model %s: batcher thread died", self.name, exc_info=True)
            self._worker_died()

    def _worker_died(self) -> None:
        """A worker cannot go on: fail everything queued, report unhealthy, tell the owner
        (the server exits so an orchestrator restarts it). Never a silent hang."""
        self.healthy = False
        self.metrics.model_ready.labels(self.name).set(0)
        pending = []
        while True:
            batch = self.queue.take(timeout=0)
            if not batch:
                break
            pending.extend(batch)
        if pending and self._loop is not None:
            self._deliver_error(pending)
        if self.on_fatal is not None:
            self.on_fatal(f"model {self.name}: a worker thread died")

    def _run_batch(self, items: list[Item], batch: PaddedBatch) -> None:
        """On the compute thread: run one batch, then (CPU) go on with the next one."""
        try:
            self._execute(items, batch)
        except BaseException:
            log.critical("model %s: fatal error in a forward pass", self.name, exc_info=True)
            self._deliver_error(items)
            self._worker_died()
            self._slots.release()
            return
        if not self._prefetch and self.healthy:
            nxt = self.queue.take(timeout=0)
            live = [it for it in nxt or [] if not it.job.cancelled]
            if live:
                self.metrics.queue_size.labels(self.name).set(len(self.queue))
                batch = pad(live, self.model.pad_token_id)
                self.compute.submit(functools.partial(self._run_batch, live, batch))
                return  # the slot passes on to the continuation
        self._slots.release()

    def _execute(self, items: list[Item], batch: PaddedBatch) -> None:
        """Forward pass, finalize, hand the rows to the event loop (or fail the batch)."""
        if all(it.job.cancelled for it in items):
            return
        start = time.perf_counter()
        try:
            pooled = self._forward(items, batch)
            rows = self._finalize(items, pooled)
        except Exception:
            log.exception("model %s: forward pass of %d inputs failed", self.name, len(items))
            self._deliver_error(items)
            return
        end = time.perf_counter()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, items, rows, start, end)

    def _forward(self, items: list[Item], batch: PaddedBatch) -> np.ndarray:
        """Forward pass; on out-of-memory, split the batch in halves and retry."""
        try:
            pooled = self.model.backend.forward(batch)
        except BackendOutOfMemory:
            if len(items) == 1:
                raise
            half = len(items) // 2
            log.warning(
                "model %s: out of memory on %d inputs x %d tokens; splitting",
                self.name, len(items), batch.shape[1],
            )  # fmt: skip
            parts = [items[:half], items[half:]]
            return np.concatenate(
                [self._forward(p, pad(p, self.model.pad_token_id)) for p in parts]
            )
        self.metrics.batches.labels(self.name).inc()
        self.metrics.batch_size.labels(self.name).observe(len(items))
        self.metrics.batch_tokens.labels(self.name).observe(batch.shape[0] * batch.shape[1])
        return pooled

    def _finalize(self, items: list[Item], pooled: np.ndarray) -> list[np.ndarray]:
        groups: dict[tuple[int | None, bool, bool], list[int]] = {}
        for row, it in enumerate(items):
            key = (it.job.dimensions, it.job.normalize, it.job.layer_norm)
            groups.setdefault(key, []).append(row)
        out: list[np.ndarray] = [pooled[0]] * len(items)
        for (dims, normalize, ln), rows in groups.items():
            vecs = finalize(pooled[rows], dimensions=dims, normalize=normalize, layer_norm_first=ln)
            for k, row in enumerate(rows):
                out[row] = vecs[k]
        return out

    def _deliver(self, items: list[Item], rows: list[np.ndarray], start: float, end: float) -> None:
        """On the event loop: store each row in its job; finish jobs that are complete."""
        for it, row in zip(items, rows, strict=True):
            job: Job = it.job
            if job.future.done():
                continue
            if not job.first_start:
                job.first_start = start
            job.last_end = end
            job.rows[it.index] = row
            job.remaining -= 1
            job.chunk_remaining[it.chunk] -= 1
            if job.chunk_remaining[it.chunk] == 0 and job.waiting_chunks:
                self.queue.put(job.waiting_chunks.pop(0))
            if job.remaining == 0:
                job.future.set_result(None)

    def _deliver_error(self, items: list[Item]) -> None:
        jobs = {id(it.job): it.job for it in items}.values()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_fail, list(jobs))


def _fail(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True  # its other queued inputs are skipped
        if not job.future.done():
            job.future.set_exception(
                BackendError("the model failed to process this request; see the server log")
            )
