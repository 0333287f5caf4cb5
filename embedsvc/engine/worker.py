"""The engine core of one model: admission, the batch queue, forward passes, post-processing.

It takes tokenized requests (`CoreJob`s) from any number of front ends and hands
finished vectors back through a `Sink`, one call per forward pass and front end, never
per request. It runs on threads of the process that holds the model:

  caller (front end or engine server thread): submit -> admit by input count, queue
  batcher thread: when the model is free, take the next batch from the queue, drop
      cancelled inputs, pad, hand it to the compute thread (on CUDA one more batch is
      formed while the previous one runs)
  compute thread (shared by all models, see compute.py): forward pass -> finalize vectors
      -> store rows in their jobs -> sink the complete jobs; on CPU it then takes the next
      batch itself while the queue is not empty. A torch model on a CPU of 2 or more cores
      has lanes (compute.Lanes): under a backlog, passes run side by side, each on its
      share of the cores; a pass with nothing queued behind it runs on every free core

Why one module of this size: every method here reads or changes the same jobs, counts and
queue under one lock, from those three kinds of threads; split, the lock's rules would be
spread over modules. What needs no lock is elsewhere: the admission decision
(admission.py), the warm-up (warmup.py), the rows' post-processing (postprocess.py), the
queue's batch choice (batcher.py) and one request's rows (job.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np

from embedsvc.backends.base import BackendOutOfMemory, ForwardOutput, LoadedModel, PaddedBatch
from embedsvc.engine.admission import RateEstimate, refusal
from embedsvc.engine.batcher import BatchQueue, Item, pad
from embedsvc.engine.compute import Lanes, compute_thread
from embedsvc.engine.job import Job
from embedsvc.engine.postprocess import TokenRule, finalize_rows
from embedsvc.engine.types import CoreJob, JobDone, JobFailed, ModelInfo
from embedsvc.engine.warmup import warm_up
from embedsvc.errors import ConfigError, ErrorKind
from embedsvc.memory import TRIMMER
from embedsvc.metrics import Metrics, observe_many
from embedsvc.model_files import default_prompt_name
from embedsvc.registry import ModelSpec
from embedsvc.settings import Settings

log = logging.getLogger(__name__)

# (origin, finished jobs, failed jobs); called from the engine's threads.
Sink = Callable[[Hashable, list[JobDone], list[JobFailed]], None]

BACKEND_FAILED = "the model failed to process this request; see the server log"
# This many failed forward passes in a row, and none succeeding between them, turn the
# worker unhealthy (/health 503) and ask the server to exit.
MAX_FAILED_BATCHES = 5


class ModelWorker:
    def __init__(
        self, spec: ModelSpec, model: LoadedModel, settings: Settings, metrics: Metrics
    ) -> None:
        self.spec = spec
        self.model = model
        self._special: frozenset[int] | None = None  # special token ids, when first asked
        colbert = model.colbert
        self._token_rule = TokenRule(
            first=model.backend.token_vectors_from,
            skip_ids=frozenset(colbert.skip_ids if colbert else ()),
            normalize=colbert.normalize if colbert else True,
        )
        self.files_verified = False  # checked against the models lock at load
        self.name = spec.name
        self.settings = settings
        self.m = metrics.for_model(spec.name)
        self.max_batch_tokens = settings.batch_tokens_for(model.backend.device)
        if self.max_batch_tokens < model.max_seq_length:
            if settings.max_batch_tokens:
                raise ConfigError(
                    f"model {self.name}: max_batch_tokens ({settings.max_batch_tokens}) is "
                    f"below its max_seq_length ({model.max_seq_length}): one input of the "
                    "longest allowed length would not fit a batch; raise --max-batch-tokens "
                    "or lower max_seq_length in models.yaml"
                )
            # auto: room for one input of the longest allowed length
            self.max_batch_tokens = model.max_seq_length
        self.queue = BatchQueue(
            self.max_batch_tokens, settings.max_batch_size, settings.batch_policy
        )
        self.queue.on_size = self.m.queue_size.set
        for d in spec.matryoshka_dims:
            if d > model.backend.dimension:
                raise ConfigError(
                    f"model {self.name}: matryoshka dim {d} exceeds the model dimension "
                    f"{model.backend.dimension}"
                )
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
        self._lanes: Lanes | None = None  # set by use_lanes (CPU torch models)
        self._lock = threading.Lock()  # guards _jobs and _inflight
        self._jobs: dict[tuple[Hashable, int], Job] = {}
        self._inflight = 0
        self._thread: threading.Thread | None = None
        self.sink: Sink = lambda origin, done, failed: None
        self.one_thread_enough = False  # measured at warm-up (torch on CPU threads)
        # int8/uint8 ranges per served size, from the calibration texts at warm-up.
        self.calibration: dict[int, tuple[list[float], list[float]]] = {}
        self.ready = False
        self.healthy = True
        self._failed_in_a_row = 0
        self._dead = False
        # Admission by time (admission.py): the rate is re-seeded at warm-up.
        self.rate = RateEstimate(1000.0)
        self._waiting_tokens = 0  # tokens of admitted jobs' chunks not queued yet
        # Called (from a worker thread) when the engine cannot go on.
        self.on_fatal: Callable[[str], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(
            spec=self.spec,
            path=str(m.path),
            device=m.backend.device,
            dtype=m.backend.dtype,
            pooling=m.pooling,
            dimension=m.backend.dimension,
            max_seq_length=m.max_seq_length,
            pad_token_id=m.pad_token_id,
            max_batch_tokens=self.max_batch_tokens,
            tokenizer_json=m.tokenizer.to_str(),
            default_prompt_name=default_prompt_name(self.spec, Path(m.path)),
            tokens_per_second=self.rate.rate,
            calibration=self.calibration,
            score_activation=m.score_activation,
            labels=m.labels,
            files_verified=self.files_verified,
            colbert=m.colbert,
            states_dimension=m.backend.states_dimension,
            precision=m.precision,
        )

    @property
    def lanes(self) -> Lanes | None:
        return self._lanes

    def use_lanes(self, lanes: Lanes) -> None:
        """Run passes in these lanes (before start; a torch model on a CPU)."""
        self._lanes = lanes
        self._slots = threading.Semaphore(len(lanes.threads))
        # torch's threads for the calling thread (taken now: tests wrap the backend later)
        self._set_threads: Callable[[int], int] = self.model.backend.cpu_threads

    def start(self, sink: Sink) -> None:
        self.sink = sink
        self._thread = threading.Thread(target=self._batch_loop, name=f"batch-{self.name}")
        self._thread.daemon = True
        self._thread.start()

    def warmup(self) -> None:
        """Run a forward pass before reporting ready (first-call costs, shape checks): the
        calibration texts, whose vectors give the int8/uint8 ranges."""
        done = warm_up(self.model, self.spec, self.compute)
        self.calibration = done.calibration
        costs = done.costs
        self.rate = RateEstimate(costs.tokens_per_second)
        self.queue.overhead_tokens = costs.overhead_tokens
        self.queue.pad_cost = costs.pad_cost
        self.one_thread_enough = costs.one_thread_enough
        log.info(
            "model %s: a forward pass costs about %.0f tokens' worth besides its tokens, "
            "a padded position %.2f of a token at a width of 32, %.2f at 128",
            self.name,
            self.queue.overhead_tokens,
            self.queue.pad_cost.at(32),
            self.queue.pad_cost.at(128),
        )
        self.ready = True
        self.m.ready.set(1)

    def stop(self) -> None:
        self.queue.close()
        self._slots.release()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def inflight_inputs(self) -> int:
        return self._inflight

    @property
    def tokens_ahead(self) -> int:
        """Real tokens admitted and not yet in a forward pass."""
        return self.queue.tokens + self._waiting_tokens

    def estimate_wait(self, tokens: int, ahead: int = 0) -> float:
        """Seconds a request of `tokens` would wait for its vectors if admitted now,
        behind what is queued here and `ahead` more; 0 when nothing is ahead (a request
        alone is always admitted)."""
        ahead += self.tokens_ahead
        return self.rate.wait(ahead, tokens) if ahead > 0 else 0.0

    # ---- requests (any thread) ---------------------------------------------------------

    def submit(self, origin: Hashable, jobs: list[CoreJob]) -> list[JobFailed]:
        """Admit and queue `jobs`; return the ones refused (over capacity, unhealthy)."""
        refused: list[JobFailed] = []
        queued: list[Item] = []
        limit = self.settings.max_concurrent_inputs
        with self._lock:
            ahead = self.tokens_ahead
            for cj in jobs:
                n = len(cj.ids)
                no = refusal(
                    self.name,
                    healthy=self.healthy,
                    inflight=self._inflight,
                    limit=limit,
                    inputs=n,
                    tokens=cj.tokens,
                    ahead=ahead,
                    rate=self.rate,
                    max_wait=cj.max_wait,
                )
                if no is not None:
                    if no.counter:
                        self.m.refusals[no.counter].inc()
                    refused.append(
                        JobFailed(cj.key, no.kind, no.message, retry_after=no.retry_after)
                    )
                    continue
                job, items = Job.admit(origin, cj, self.settings.max_client_batch_size)
                self._jobs[(origin, cj.key)] = job
                self._inflight += n
                if job.waiting_chunks:
                    self._waiting_tokens += job.waiting_tokens
                ahead += cj.tokens
                queued.extend(items)
            inflight = self._inflight
        if queued:
            self.queue.put(queued)
        self.m.inflight.set(inflight)
        return refused

    def cancel(self, origin: Hashable, keys: list[int]) -> None:
        """Drop jobs whose client has gone: their queued inputs are skipped."""
        with self._lock:
            for key in keys:
                job = self._jobs.pop((origin, key), None)
                if job is not None:
                    job.cancelled = True
                    self._inflight -= job.size
                    self._drop_waiting(job)
            inflight = self._inflight
        self.m.inflight.set(inflight)

    def forget(self, origin: Hashable) -> None:
        """A front end has gone: drop everything it had in flight."""
        with self._lock:
            keys = [k for (o, k) in self._jobs if o == origin]
        self.cancel(origin, keys)

    # ---- worker threads --------------------------------------------------------------

    def _take_live(self, timeout: float | None) -> list[Item] | None:
        """The next batch without the inputs of cancelled jobs. Jobs still waiting for
        their first forward pass at their deadline are failed here (429) before one is
        spent on them; a job already started runs to the end (a big request admitted
        alone may take longer than the limit by itself)."""
        items = self.queue.take(timeout)
        if items is None:
            return None
        now = time.perf_counter()
        late = {
            id(it.job): it.job for it in items if it.job.deadline < now and not it.job.first_start
        }
        if late:
            self._expire(list(late.values()))
        return [it for it in items if not it.job.cancelled]

    def _expire(self, jobs: list[Job]) -> None:
        failed: dict[Hashable, list[JobFailed]] = defaultdict(list)
        with self._lock:
            for job in jobs:
                if self._jobs.pop((job.origin, job.key), None) is None:
                    continue
                job.cancelled = True
                self._inflight -= job.size
                self._drop_waiting(job)
                self.m.refusals["deadline"].inc()
                limit = job.deadline - job.enqueued
                failed[job.origin].append(
                    JobFailed(
                        job.key,
                        ErrorKind.OVERLOADED,
                        f"model {self.name} could not answer this request within its limit "
                        f"of {limit:g} s (the model is overloaded); retry later or elsewhere",
                        retry_after=max(1, round(limit)),
                    )
                )
            inflight = self._inflight
        self.m.inflight.set(inflight)
        for origin, lst in failed.items():
            self.sink(origin, [], lst)

    def _drop_waiting(self, job: Job) -> None:
        """A job ends early: its chunks not yet queued never will be (under _lock)."""
        self._waiting_tokens -= job.waiting_tokens
        job.waiting_chunks = []

    def _batch_loop(self) -> None:
        try:
            while True:
                self._slots.acquire()
                live = self._take_live(None)
                if live is None:
                    return
                if not live:
                    self._slots.release()
                    continue
                batch = pad(live, self.model.pad_token_id)
                if self._lanes is not None:
                    self._lanes.submit(functools.partial(self._run_batch, live, batch))
                else:
                    self.compute.submit(functools.partial(self._run_batch, live, batch))
        except BaseException:
            log.critical("model %s: batcher thread died", self.name, exc_info=True)
            self._worker_died()

    def _worker_died(self, reason: str = "a worker thread died") -> None:
        """A worker cannot go on: fail everything admitted, report unhealthy, tell the
        owner (the server exits so an orchestrator restarts it). Never a silent hang."""
        with self._lock:
            if self._dead:
                return
            self._dead = True
        self.healthy = False
        self.m.ready.set(0)
        self.queue.close()  # the batcher thread ends; submits are refused (unhealthy)
        while self.queue.take(timeout=0):
            pass
        with self._lock:
            jobs = list(self._jobs.values())
        self._fail(jobs)
        if self.on_fatal is not None:
            self.on_fatal(f"model {self.name}: {reason}")

    def _run_batch(self, items: list[Item], batch: PaddedBatch, lane: int = -1) -> None:
        """On the compute thread: run one batch, then (CPU) go on with the next one. A
        failure anywhere here, including while forming the next batch (whose inputs are
        then out of the queue), fails every admitted job: nothing is left waiting."""
        try:
            self._execute(items, batch, lane)
            if TRIMMER.maybe_trim(idle=len(self.queue) == 0):
                self.m.malloc_trims.inc()
            if not self._prefetch and self.healthy:
                live = self._take_live(0)
                if live:
                    batch = pad(live, self.model.pad_token_id)
                    if self._lanes is not None:
                        self._lanes.on(lane, functools.partial(self._run_batch, live, batch))
                    else:
                        self.compute.submit(functools.partial(self._run_batch, live, batch))
                    return  # the slot passes on to the continuation
        except BaseException:
            log.critical("model %s: fatal error on the compute thread", self.name, exc_info=True)
            self._worker_died()
        self._slots.release()

    def _execute(self, items: list[Item], batch: PaddedBatch, lane: int = -1) -> None:
        """Forward pass, finalize, store rows; sink the complete jobs (or fail the batch)."""
        if all(it.job.cancelled for it in items):
            return
        cores = 0
        if self._lanes is not None:
            cores = self._lanes.take(lane, backlog=len(self.queue) > 0)
        start = time.perf_counter()
        try:
            if cores and self._lanes is not None and self._lanes.set_threads[lane] != cores:
                self._set_threads(cores)
                self._lanes.set_threads[lane] = cores
            output = self._forward(items, batch)
            rows = finalize_rows(
                items, output, self.spec.task == "sparse", self._special_ids, self._token_rule
            )
        except Exception:
            log.exception("model %s: forward pass of %d inputs failed", self.name, len(items))
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= MAX_FAILED_BATCHES and self.healthy:
                # Inputs are validated before they are queued, so this is the device or
                # the backend (a sticky CUDA error, say), not a request: stop pretending.
                # Unhealthy first: a client told of this failure then finds /health red.
                log.critical(
                    "model %s: %d forward passes in a row failed; reporting unhealthy",
                    self.name,
                    self._failed_in_a_row,
                )
                self._worker_died(f"{self._failed_in_a_row} forward passes in a row failed")
            self._fail([it.job for it in items])  # those not failed with the rest above
            return
        finally:
            if cores:
                assert self._lanes is not None
                self._lanes.give(lane, cores)
        self._failed_in_a_row = 0
        end = time.perf_counter()
        # Passes side by side: a pass on some of the cores counts for that share of its
        # time, so the rate stays the model's throughput (admission.py).
        share = cores / self._lanes.cores if cores and self._lanes is not None else 1.0
        self.rate.update(sum(it.length for it in items), (end - start) * share)
        done: dict[Hashable, list[JobDone]] = defaultdict(list)
        failed: dict[Hashable, list[JobFailed]] = defaultdict(list)
        more: list[Item] = []
        completed: list[Job] = []
        sparse_limit = self.settings.max_sparse_values
        with self._lock:
            for it, row in zip(items, rows, strict=True):
                job: Job = it.job
                if job.cancelled:
                    continue
                more += job.store(it, row, start, end)
                if job.sparse_entries > sparse_limit:
                    # The answer would be too large (SPLADE rows have up to a vocabulary of
                    # entries each): the job ends here, before more of it is kept or built.
                    del self._jobs[(job.origin, job.key)]
                    job.cancelled = True
                    self._inflight -= job.size
                    self._drop_waiting(job)
                    failed[job.origin].append(_too_many_entries(job, sparse_limit))
                    continue
                if job.remaining == 0:
                    del self._jobs[(job.origin, job.key)]
                    self._inflight -= job.size
                    done[job.origin].append(job.done())
                    completed.append(job)
            inflight = self._inflight
            self._waiting_tokens -= sum(it.length for it in more)
        if more:
            self.queue.put(more)
        self._observe(completed)
        self.m.inflight.set(inflight)
        self.m.rate.set(self.rate.rate)
        self.m.wait_estimate.set(self.tokens_ahead / self.rate.rate)
        for origin, finished in done.items():
            self.sink(origin, finished, failed.pop(origin, []))
        for origin, lst in failed.items():
            self.sink(origin, [], lst)

    def _observe(self, jobs: list[Job]) -> None:
        """The metrics of the jobs a pass completed, in one update each."""
        if not jobs:
            return
        phase = self.m.phase
        observe_many(phase["queue"], [max(j.first_start - j.enqueued, 0.0) for j in jobs])
        observe_many(phase["inference"], [max(j.last_end - j.first_start, 0.0) for j in jobs])
        self.m.inputs.inc(sum(j.size for j in jobs))
        self.m.tokens.inc(sum(j.tokens for j in jobs))

    def _forward(self, items: list[Item], batch: PaddedBatch) -> ForwardOutput:
        """Forward pass; on out-of-memory, split the batch in halves and retry."""
        try:
            output = self.model.backend.forward(batch)
        except BackendOutOfMemory:
            if len(items) == 1:
                raise
            half = len(items) // 2
            log.warning(
                "model %s: out of memory on %d inputs x %d tokens; splitting",
                self.name,
                len(items),
                batch.shape[1],
            )
            parts = [items[:half], items[half:]]
            outs = [self._forward(p, pad(p, self.model.pad_token_id)) for p in parts]
            width = batch.shape[1]  # each half is padded to its own longest input
            first = self.model.backend.token_vectors_from
            return ForwardOutput(
                np.concatenate([o.pooled for o in outs]),
                _joined([o.token_weights for o in outs], [len(p) for p in parts], width),
                _joined([o.token_vectors for o in outs], [len(p) for p in parts], width - first),
                _joined([o.token_states for o in outs], [len(p) for p in parts], width),
            )
        self.m.batches.inc()
        self.m.batch_size.observe(len(items))
        self.m.batch_tokens.observe(batch.shape[0] * batch.shape[1])
        return output

    def _special_ids(self) -> frozenset[int]:
        """Special tokens ([CLS], </s>, padding, ...): no lexical weight of their own."""
        if self._special is None:
            decoder = self.model.tokenizer.get_added_tokens_decoder()
            self._special = frozenset(i for i, t in decoder.items() if t.special)
        return self._special

    def _fail(self, jobs: list[Job]) -> None:
        failed: dict[Hashable, list[JobFailed]] = defaultdict(list)
        with self._lock:
            for job in {id(j): j for j in jobs}.values():
                if self._jobs.pop((job.origin, job.key), None) is None:
                    continue  # already finished, failed or cancelled
                job.cancelled = True  # its other queued inputs are skipped
                self._inflight -= job.size
                self._drop_waiting(job)
                failed[job.origin].append(JobFailed(job.key, ErrorKind.BACKEND, BACKEND_FAILED))
            inflight = self._inflight
        self.m.inflight.set(inflight)
        for origin, lst in failed.items():
            self.sink(origin, [], lst)


def _joined(halves: list[np.ndarray | None], rows: list[int], width: int) -> np.ndarray | None:
    """Per-token outputs of the halves of a split batch as one array [rows, width, ...]:
    each half padded with zeros to `width` positions; a half that has none (none of its
    jobs asked) is zeros."""
    shaped = next((h for h in halves if h is not None), None)
    if shaped is None:
        return None
    out = np.zeros((sum(rows), width, *shaped.shape[2:]), dtype=np.float32)
    start = 0
    for half, n in zip(halves, rows, strict=True):
        if half is not None:
            out[start : start + n, : half.shape[1]] = half
        start += n
    return out


def _too_many_entries(job: Job, limit: int) -> JobFailed:
    return JobFailed(
        job.key,
        ErrorKind.PAYLOAD_TOO_LARGE,
        f"the answer would hold more than max_sparse_values ({limit}) non-zero entries "
        f"({job.sparse_entries} from {job.size - job.remaining} of its {job.size} "
        "inputs); send fewer inputs per request",
        param="inputs",
    )
