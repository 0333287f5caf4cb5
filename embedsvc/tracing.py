"""Request traces over OpenTelemetry (--otlp-endpoint, or the standard OTEL_EXPORTER_OTLP_
ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variables): one span per engine request, a
child of the caller's span when the request carries a W3C `traceparent`, with the model,
the inputs and the tokens as attributes, and four children: tokenize, queue, inference and
serialize. Exported over OTLP/HTTP (protobuf) in batches by the SDK's BatchSpanProcessor,
off the request path.

The spans are made when the answer is ready, from the times the engine measured for the
request (EmbedResult), not opened and closed around each step: nothing runs per step, and
with tracing off (the default) a request pays one `is None` test.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from embedsvc.errors import ConfigError

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector address (its /v1/traces when no path)."""
    base = endpoint.rstrip("/")
    rest = base.split("://", 1)[-1]
    return base if "/" in rest else base + "/v1/traces"


class Tracer:
    """Spans of finished requests, exported by the OpenTelemetry SDK."""

    def __init__(self, endpoint: str | None, service_name: str) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError(
                "tracing needs OpenTelemetry: pip install 'embedsvc[otel]' (the images have it)"
            ) from None
        resource = Resource.create({"service.name": service_name})
        self._provider = TracerProvider(resource=resource)
        # No endpoint given: the exporter reads the OTEL_EXPORTER_OTLP_* variables itself.
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint) if endpoint else None)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("embedsvc")
        self._propagator = TraceContextTextMapPropagator()
        self._in_span = trace.set_span_in_context

    @classmethod
    def from_settings(cls, endpoint: str, service_name: str) -> Tracer | None:
        """A tracer when an endpoint is set (the flag, or the OpenTelemetry variables)."""
        if not endpoint and not any(os.environ.get(v) for v in ENDPOINT_VARIABLES):
            return None
        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        tracer = cls(endpoint or None, name)
        where = traces_url(endpoint) if endpoint else "the OTEL_EXPORTER_OTLP_* variables"
        log.info("tracing: a span per request to %s as service %s", where, name)
        return tracer

    def request(
        self,
        route: str,
        traceparent: str,
        phases: tuple[float, float, float, float],
        serialize_started: float,
        attributes: dict[str, Any],
    ) -> None:
        """The spans of a request answered now: `phases` are the seconds it spent in
        tokenizing, queueing, inference and in all (the engine's measures);
        `serialize_started`: time.perf_counter() when its answer began to be rendered."""
        tokenize, queue, inference, total = phases
        end = time.time_ns()
        serialize = time.perf_counter() - serialize_started
        start = end - int((total + serialize) * 1e9)
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        span = self._tracer.start_span(
            f"POST {route}", context=parent, start_time=start, attributes=attributes
        )
        inside = self._in_span(span)
        at = start
        for name, seconds in (
            ("tokenize", tokenize),
            ("queue", queue),
            ("inference", inference),
        ):
            step = int(seconds * 1e9)
            self._tracer.start_span(name, context=inside, start_time=at).end(end_time=at + step)
            at += step
        serialize_start = end - int(serialize * 1e9)
        child = self._tracer.start_span("serialize", context=inside, start_time=serialize_start)
        child.end(end_time=end)
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is left (at the server's stop)."""
        self._provider.shutdown()
