"""Every Prometheus metric of the service, in one place.

One `Metrics` object per server (its own CollectorRegistry), so several servers can live
in one process (tests) without clashing. Engine threads only touch thread-safe
prometheus_client objects.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.model_ready = Gauge(
            "embedsvc_model_ready", "1 once the model is loaded and warmed", ["model"], registry=r
        )
        self.queue_size = Gauge(
            "embedsvc_queue_size", "inputs waiting for a forward pass", ["model"], registry=r
        )
        self.inflight_inputs = Gauge(
            "embedsvc_inflight_inputs",
            "inputs admitted and not yet answered",
            ["model"],
            registry=r,
        )
        self.batches = Counter("embedsvc_batches", "forward passes run", ["model"], registry=r)
        self.batch_size = Histogram(
            "embedsvc_batch_size", "inputs per forward pass", ["model"],
            buckets=_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_tokens = Histogram(
            "embedsvc_batch_tokens", "padded tokens per forward pass", ["model"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
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
        self.failures = Counter(
            "embedsvc_request_failures", "requests failed, by error kind", ["route", "kind"],
            registry=r,
        )  # fmt: skip
        self.inputs = Counter("embedsvc_inputs", "inputs embedded", ["model"], registry=r)
        self.tokens = Counter(
            "embedsvc_tokens", "real (unpadded) tokens embedded", ["model"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
