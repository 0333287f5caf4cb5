"""Every Prometheus metric of the service, in one place.

One `Metrics` object per server (its own CollectorRegistry), so several servers can live
in one process (tests) without clashing. Engine threads only touch thread-safe
prometheus_client objects.

With several processes (front ends and an engine, see server.py) every process writes
its values to memory-mapped files in one folder (prometheus_client's multiprocess mode),
and /metrics, whichever front end answers it, renders the sum over all of them.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def enable_multiprocess(folder: str) -> None:
    """prometheus_client's multiprocess mode for this process: every value created from
    here on lives in a file of `folder`. What the library requires (it reads the folder
    from the environment when it creates each value file, and its value class is
    process-wide); done once by each server process at its start (server.py), before its
    `Metrics(multiprocess_dir=folder)`."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.MultiProcessValue()


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        """A server's metrics; `multiprocess_dir`: render every process's values from that
        folder (after `enable_multiprocess(multiprocess_dir)` in this process). Over 80
        lines (a reason): every metric is declared here, one statement each, so that all
        of them are in one place."""
        if multiprocess_dir and os.environ.get("PROMETHEUS_MULTIPROC_DIR") != multiprocess_dir:
            raise RuntimeError("enable_multiprocess(folder) first: values would stay private")
        self.multiprocess_dir = multiprocess_dir
        r = self.registry = CollectorRegistry()
        # The engine process alone sets these gauges; "live" drops a dead process's values.
        self.model_ready = Gauge(
            "embedsvc_model_ready",
            "1 once the model is loaded and warmed",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.queue_size = Gauge(
            "embedsvc_queue_size",
            "inputs waiting for a forward pass",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight_inputs = Gauge(
            "embedsvc_inflight_inputs",
            "inputs admitted and not yet answered",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.service_rate = Gauge(
            "embedsvc_service_rate_tokens_per_second",
            "moving estimate of real tokens a second the model's forward passes get through",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.wait_estimate = Gauge(
            "embedsvc_queue_time_estimate_seconds",
            "estimated wait of a request admitted now: tokens queued ahead / service rate",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache = Counter(
            "embedsvc_cache",
            "inputs looked up in the vector cache (--cache-bytes): hit, miss; evicted: "
            "entries dropped for room",
            ["model", "outcome"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "embedsvc_cache_bytes",
            "bytes held by the vector cache (each front-end process holds its own)",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.refusals = Counter(
            "embedsvc_refusals",
            "requests refused (429) by admission: capacity (inputs in flight), queue_time "
            "(estimated wait over the limit), deadline (dropped after waiting past it)",
            ["model", "reason"],
            registry=r,
        )
        self.batches = Counter("embedsvc_batches", "forward passes run", ["model"], registry=r)
        self.batch_size = Histogram(
            "embedsvc_batch_size",
            "inputs per forward pass",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "embedsvc_batch_tokens",
            "padded tokens per forward pass",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "embedsvc_request_duration_seconds",
            "time per request by phase (tokenization, queue, inference, total)",
            ["model", "phase"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "embedsvc_requests", "embedding requests answered", ["model", "route"], registry=r
        )
        # Token vectors and states make answers of megabytes: what leaves, per route.
        self.response_bytes = Counter(
            "embedsvc_response_bytes",
            "bytes of the bodies of embedding requests answered",
            ["model", "route"],
            registry=r,
        )
        self.failures = Counter(
            "embedsvc_request_failures",
            "requests failed, by error kind",
            ["route", "kind"],
            registry=r,
        )
        self.connections_closed = Counter(
            "embedsvc_connections_closed",
            "client connections refused or closed by the HTTP bounds, by reason: "
            "header_timeout, body_timeout, headers_too_large, too_many_connections, "
            "write_timeout (a client read nothing), unsent_budget (answers held for "
            "non-readers passed max_unsent_bytes)",
            ["reason"],
            registry=r,
        )
        self.inputs = Counter("embedsvc_inputs", "inputs embedded", ["model"], registry=r)
        self.tokens = Counter(
            "embedsvc_tokens", "real (unpadded) tokens embedded", ["model"], registry=r
        )

        self.malloc_trims = Counter(
            "embedsvc_malloc_trims",
            "times free heap memory was handed back to the OS",
            registry=r,
        )
        # process_* (CPU, resident memory, open files) of the process that answers /metrics,
        # and the resident memory of the whole server (engine process and front ends).
        self.process = ProcessCollector(registry=r)
        r.register(ServerMemoryCollector(os.getpid(), children=False))

    def for_model(self, model: str) -> ModelMetrics:
        """The model's labelled series, looked up once (a lookup per request costs more
        than the update)."""
        return ModelMetrics(self, model)

    def render(self) -> bytes:
        if self.multiprocess_dir:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
            merged.register(self.process)
            # A front end answers: the server is its parent (the engine) and the siblings.
            merged.register(ServerMemoryCollector(os.getppid(), children=True))
            return generate_latest(merged)
        return generate_latest(self.registry)

    def process_gone(self, pid: int) -> None:
        """Drop the live gauges of a process that has exited (multiprocess mode)."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(pid, self.multiprocess_dir)


class ModelMetrics:
    """One model's series of the metrics above."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.ready = m.model_ready.labels(model)
        self.cache_hits = m.cache.labels(model, "hit")
        self.cache_misses = m.cache.labels(model, "miss")
        self.cache_evictions = m.cache.labels(model, "evicted")
        self.cache_bytes = m.cache_bytes.labels(model)
        self.queue_size = m.queue_size.labels(model)
        self.inflight = m.inflight_inputs.labels(model)
        self.batches = m.batches.labels(model)
        self.batch_size = m.batch_size.labels(model)
        self.batch_tokens = m.batch_tokens.labels(model)
        self.inputs = m.inputs.labels(model)
        self.tokens = m.tokens.labels(model)
        self.malloc_trims = m.malloc_trims
        self.rate = m.service_rate.labels(model)
        self.wait_estimate = m.wait_estimate.labels(model)
        self.refusals = {
            r: m.refusals.labels(model, r) for r in ("capacity", "queue_time", "deadline")
        }
        self.phase = {
            p: m.duration.labels(model, p) for p in ("tokenization", "queue", "inference", "total")
        }
        self._requests, self._response_bytes = m.requests, m.response_bytes
        self._model = model
        self._routes: dict[str, tuple[Counter, Counter]] = {}

    def route(self, label: str) -> tuple[Counter, Counter]:
        """The requests answered and the bytes of their 200s for one route label (a
        Route's `label`, api/calls.py), created at the route's first request."""
        series = self._routes.get(label)
        if series is None:
            series = self._routes[label] = (
                self._requests.labels(self._model, label),
                self._response_bytes.labels(self._model, label),
            )
        return series


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """`histogram.observe(a)` for each of `amounts` (a labelled child), in one update of
    the sum and one per bucket touched. Each observe takes a lock twice and walks the
    bucket bounds in Python: for the per-request phases of a forward pass of 32 short
    queries that came to a few microseconds a request, on the threads that feed the
    model and answer. Falls back to observe() where the library's histogram is laid out
    otherwise."""
    if not amounts:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for a in amounts:
            histogram.observe(a)
        return
    total.inc(sum(amounts))
    # observe() counts an amount in the first bucket whose bound is >= it (+Inf last).
    for i, n in Tally(bisect_left(bounds, a) for a in amounts).items():
        buckets[i].inc(n)


class ServerMemoryCollector(Collector):
    """embedsvc_server_resident_memory_bytes: RSS of process `root` (and its children),
    read from /proc at scrape time (absent where there is no /proc)."""

    def __init__(self, root: int, children: bool) -> None:
        self.root = root
        self.children = children

    def collect(self) -> Iterator[GaugeMetricFamily]:
        total = rss_bytes(self.root)
        if total is None:
            return
        children: list[str] = []
        if self.children:
            try:
                path = Path(f"/proc/{self.root}/task/{self.root}/children")
                children = path.read_text().split()
            except OSError:
                pass
        total += sum(rss_bytes(int(c)) or 0 for c in children)
        yield GaugeMetricFamily(
            "embedsvc_server_resident_memory_bytes",
            "resident memory of the server: the engine process and its front-end processes",
            value=total,
        )


def rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
